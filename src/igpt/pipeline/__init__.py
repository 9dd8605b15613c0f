"""The quickstart: its plan, the time budget, the resumable job and its report."""
