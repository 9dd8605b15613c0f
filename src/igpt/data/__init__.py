"""Images to tokens: the dataset sources, the palette, the prepare stage and the prepared-set reader."""
