// cascade page: sends the chosen DICOM to /v1/predict (JSON and PNG overlay; SEG, SR and SC on demand) and shows
// the answer.
// Nothing is stored: the file stays in this page's memory, the token in this tab's sessionStorage.
"use strict";

const $ = (id) => document.getElementById(id);
let current = null;      // the chosen File
let urls = [];           // object URLs to revoke on the next file

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function headers() {
  const h = { "Content-Type": "application/dicom" };
  const token = sessionStorage.getItem("cascade-token");
  if (token) h.Authorization = "Bearer " + token;
  return h;
}

async function post(format) {
  const response = await fetch("/v1/predict?format=" + format, { method: "POST", headers: headers(), body: current });
  if (response.status === 401) {
    $("auth").hidden = false;
    throw new Error("this service needs an access token: enter it above");
  }
  if (!response.ok && response.status !== 204) {
    let reason = response.statusText;
    try { reason = (await response.json()).error; } catch (e) { /* not JSON */ }
    throw new Error(reason + " (HTTP " + response.status + ")");
  }
  return response;
}

function objectUrl(blob) {
  const url = URL.createObjectURL(blob);
  urls.push(url);
  return url;
}

function ms(label, value) { return label + "\u00a0" + value.toFixed(1) + "\u00a0ms"; }

function show(answer, png) {
  const decision = $("decision");
  decision.textContent = answer.positive ? "pneumothorax" : "no pneumothorax";
  decision.className = answer.positive ? "positive" : "negative";
  const probability = $("probability");
  probability.textContent = answer.probability.toFixed(4);
  probability.dataset.value = String(answer.probability);
  $("mask").textContent = answer.positive
    ? answer.mask_pixels + " of " + answer.height + " × " + answer.width + " pixels"
    : "none (" + answer.height + " × " + answer.width + ")";
  const t = answer.timing_ms;
  $("timing").textContent = [ms("decode", t.decode), ms("classifier", t.classifier), ms("segmenter", t.segmenter),
    ms("total", t.total)].join(" · ") + " (batch\u00a0of\u00a0" + answer.batch_size + ")";
  $("model").textContent = answer.model.name + ", cascade " + answer.model.version + " (weights "
    + answer.model.weights_sha256.slice(0, 12) + "…)";
  $("uid").textContent = answer.image_id;
  $("uid").hidden = true;
  $("show-uid").hidden = false;
  const csv = "ImageId,EncodedPixels\n" + answer.image_id + "," + answer.rle + "\n";
  $("download-rle").href = objectUrl(new Blob([csv], { type: "text/csv" }));
  const pngUrl = objectUrl(png);
  $("download-png").href = pngUrl;
  for (const [id, why] of [["download-seg", "nothing to segment"], ["download-sc", "no outline to draw"]]) {
    $(id).className = answer.positive ? "" : "disabled";
    $(id).title = answer.positive ? "" : "negative image: " + why;
  }
  $("overlay").src = pngUrl;
  $("result").hidden = false;
}

async function analyse(file) {
  if (!file) return;
  current = file;
  urls.forEach((url) => URL.revokeObjectURL(url));
  urls = [];
  $("result").hidden = true;
  status("Analysing a " + (file.size / 1024).toFixed(0) + " kB file …");
  try {
    const [json, png] = await Promise.all([post("json"), post("png")]);
    show(await json.json(), await png.blob());
    status("Done: " + (file.size / 1024).toFixed(0) + " kB file analysed.");
  } catch (err) {
    status(err.message, true);
  }
}

const FILES = { seg: "cascade-seg.dcm", sr: "cascade-sr.dcm", sc: "cascade-sc.dcm" };

async function download(event) {
  event.preventDefault();
  const format = event.currentTarget.dataset.format;
  if (!current || event.currentTarget.className === "disabled") return;
  try {
    const response = await post(format);
    if (response.status === 204) { status("Negative image: no " + event.currentTarget.textContent + "."); return; }
    const link = document.createElement("a");
    link.href = objectUrl(await response.blob());
    link.download = FILES[format];
    document.body.appendChild(link);
    link.click();
    link.remove();
  } catch (err) {
    status(err.message, true);
  }
}

$("file").addEventListener("change", (e) => analyse(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  analyse(e.dataTransfer.files[0]);
});
$("show-uid").addEventListener("click", () => { $("uid").hidden = false; $("show-uid").hidden = true; });
for (const id of ["download-seg", "download-sr", "download-sc"]) $(id).addEventListener("click", download);
$("retry").addEventListener("click", () => {
  sessionStorage.setItem("cascade-token", $("token").value.trim());
  $("auth").hidden = true;
  analyse(current);
});
