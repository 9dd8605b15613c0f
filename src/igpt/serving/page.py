"""The completion page that `igpt serve` answers GET / with: one self-contained HTML document (styles and
script inline, nothing fetched from elsewhere)."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>igpt: complete an image</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font-family: system-ui, sans-serif; max-width: 1000px; margin: 1.5em auto; padding: 0 1em;
  color: #222; }
fieldset { border: 1px solid #ccc; border-radius: 6px; margin: 0 0 1em; }
label { display: inline-block; margin: 0.3em 1.2em 0.3em 0; }
input[type=number] { width: 5em; }
#error { color: #b00020; min-height: 1.2em; font-weight: 600; }
#status { color: #555; min-height: 1.2em; }
.row { display: flex; gap: 10px; flex-wrap: wrap; align-items: flex-start; }
.cell { text-align: center; font-size: 0.8em; color: #555; }
.cell img { display: block; image-rendering: pixelated; border: 1px solid #ddd; }
button { font-size: 1em; padding: 0.4em 1.4em; }
</style></head>
<body>
<h1>Complete an image</h1>
<p id="about"></p>
<form id="form">
<fieldset><legend>Image</legend>
  <label><input type="radio" name="source" value="test" checked> test image
    <input type="number" id="index" name="index" value="0" min="0"></label>
  <button type="button" id="random">random</button>
  <label><input type="radio" name="source" value="upload"> upload
    <input type="file" id="file" name="file" accept="image/*"></label>
  <div class="row"><div class="cell"><img id="preview" alt="chosen image"></div></div>
</fieldset>
<fieldset><legend>Sampling</legend>
  <label>rows kept <input type="number" id="keep_rows" name="keep_rows" min="0"></label>
  <label>temperature
    <input type="number" id="temperature" name="temperature" value="1.0" min="0" step="0.1"></label>
  <label>samples <input type="number" id="num" name="num" value="4" min="1"></label>
  <label>seed <input type="number" id="seed" name="seed" value="0"></label>
  <button type="submit" id="go">Complete</button>
</fieldset>
</form>
<div id="error"></div><div id="status"></div>
<div class="row" id="result"></div>
<script>
"use strict";
let info = null;
const $ = (id) => document.getElementById(id);
function source() { return document.querySelector("input[name=source]:checked").value; }
function cell(label, src, id) {
  const d = document.createElement("div"); d.className = "cell";
  const im = document.createElement("img"); im.src = src; im.alt = label; if (id) im.id = id;
  d.appendChild(im); d.appendChild(document.createTextNode(label)); return d;
}
function preview() {
  $("error").textContent = "";
  if (source() === "test") {
    $("preview").src = "/api/test/" + ($("index").value || 0) + ".png";
  } else if ($("file").files.length) {
    $("preview").src = URL.createObjectURL($("file").files[0]);
  }
}
async function load() {
  info = await (await fetch("/api/info")).json();
  const names = info.class_names ? " (" + info.class_names.length + " classes)" : "";
  $("about").textContent = "Run " + info.run + ": " + info.objective.toUpperCase() + " model, " +
    info.resolution + "x" + info.resolution + " pixels, " + info.clusters + " palette colours, " +
    info.n_test + " test images" + names + ".";
  $("keep_rows").max = info.resolution; $("keep_rows").value = Math.floor(info.resolution / 2);
  $("num").max = info.max_samples; $("index").max = Math.max(0, info.n_test - 1);
  if (info.n_test === 0) { document.querySelector("input[value=upload]").checked = true; }
  preview();
}
$("random").onclick = () => { document.querySelector("input[value=test]").checked = true;
  $("index").value = Math.floor(Math.random() * info.n_test); preview(); };
$("index").oninput = () => { document.querySelector("input[value=test]").checked = true; preview(); };
$("file").onchange = () => { document.querySelector("input[value=upload]").checked = true; preview(); };
$("form").onsubmit = async (ev) => {
  ev.preventDefault();
  $("error").textContent = ""; $("status").textContent = "sampling..."; $("go").disabled = true;
  delete $("result").dataset.done;
  const body = new FormData();
  body.append("source", source());
  for (const k of ["index", "keep_rows", "temperature", "num", "seed"]) body.append(k, $(k).value);
  if (source() === "upload") {
    if (!$("file").files.length) { $("error").textContent = "choose an image file to upload";
      $("status").textContent = ""; $("go").disabled = false; return; }
    if ($("file").files[0].size > info.max_upload_bytes) {
      // the server refuses it too; saying so here saves the upload
      const kib = Math.floor(info.max_upload_bytes / 1024);
      $("error").textContent = "the upload is larger than the " + kib + " KiB limit";
      $("status").textContent = ""; $("go").disabled = false; return; }
    body.append("file", $("file").files[0]);
  }
  try {
    const resp = await fetch("/api/complete", { method: "POST", body });
    if (!resp.ok) {
      let msg = resp.status + " " + resp.statusText;
      try { msg = (await resp.json()).error; } catch (e) {}
      throw new Error(msg);
    }
    const reader = resp.body.getReader(); const dec = new TextDecoder(); let buf = "";
    const res = $("result"); res.innerHTML = ""; let samples = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let nl;
      while ((nl = buf.indexOf("\\n")) >= 0) {
        const m = JSON.parse(buf.slice(0, nl)); buf = buf.slice(nl + 1);
        if (m.original) {
          res.appendChild(cell("original", m.original));
          res.appendChild(cell("kept: " + m.keep_rows + " rows", m.kept));
        } else if (m.samples) {
          if (!samples.length) samples = m.samples.map((s, i) => {
            const c = cell("sample " + (i + 1), s, "sample" + i);
            res.appendChild(c); return c.querySelector("img"); });
          m.samples.forEach((s, i) => { samples[i].src = s; });
          $("status").textContent = "row " + m.rows_done + " of " + info.resolution;
        } else if (m.done) {
          $("status").textContent = "done: " + m.tokens + " tokens in " + m.seconds.toFixed(2) + " s";
          res.dataset.done = "1";
        }
      }
    }
  } catch (e) {
    $("error").textContent = e.message; $("status").textContent = "";
  } finally { $("go").disabled = false; }
};
load();
</script>
</body></html>
"""
