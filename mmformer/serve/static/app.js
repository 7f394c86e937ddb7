// The try-it page: everything goes through the server's own /v1 routes.
"use strict";
const $ = (id) => document.getElementById(id);
let health = null;
let lastFile = null;

// Only the latest action's answers are shown: a new file (or new labels) aborts the requests of the one before
// (the server then drops or stops their work) and answers of an earlier one that still arrive are ignored.
function turns() {
  let controller = null;
  return () => {
    if (controller) controller.abort();
    const mine = new AbortController();
    controller = mine;
    return { signal: mine.signal, current: () => controller === mine };
  };
}
const mediaTurn = turns();
const promptTurn = turns();

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = $("key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function call(path, body, signal) {
  const json = !(body instanceof FormData);
  const response = await fetch(path, { method: "POST", headers: headers(json), body: json ? JSON.stringify(body) : body,
                                       signal });
  const type = response.headers.get("content-type") || "";
  const data = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok) throw new Error(data.error ? data.error.message : String(data));
  return data;
}

function showError(e) { $("error").textContent = e ? String(e.message || e) : ""; }

function serves(route) { return health && health.routes.includes("/v1/" + route); }
function reads(modality) { return health && (health.modalities || []).includes(modality); }

// What the page can do with a file of each kind on this model: classify it (zero-shot), caption an image,
// transcribe audio.
function takes(kind) {
  if (kind === "image") return serves("captions") || (serves("classify") && reads("image"));
  if (kind === "audio") return serves("audio/transcriptions") || (serves("classify") && reads("audio"));
  return false;
}

function kindOf(file) {
  if (file.type.startsWith("audio/") || /\.(wav|flac|ogg|mp3|opus|m4a)$/i.test(file.name)) return "audio";
  if (file.type.startsWith("image/") || /\.(png|jpe?g|gif|bmp|webp|tiff?)$/i.test(file.name)) return "image";
  return null;
}

function taken() { return ["image", "audio"].filter(takes); }

function readBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.split(",", 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function labels() { return $("labels").value.split(",").map((s) => s.trim()).filter(Boolean); }
function templates() { return $("templates").value.split("|").map((s) => s.trim()).filter(Boolean); }

function showBars(names, scores) {
  const order = names.map((n, i) => [n, scores[i]]).sort((a, b) => b[1] - a[1]);
  $("bars").replaceChildren(...order.map(([name, p]) => {
    const li = document.createElement("li");
    li.dataset.label = name;
    const label = document.createElement("span"); label.className = "label"; label.textContent = name;
    const track = document.createElement("span");
    const bar = document.createElement("div"); bar.className = "bar"; bar.style.width = (100 * p).toFixed(1) + "%";
    track.append(bar);
    const value = document.createElement("span"); value.className = "p"; value.textContent = p.toFixed(3);
    li.append(label, track, value);
    return li;
  }));
}

function clock(t) { return t.toFixed(2) + " s"; }

async function classify(kind, data, turn) {
  if (!serves("classify") || !reads(kind) || !labels().length) return;
  const result = await call("/v1/classify", { model: health.model, labels: labels(), templates: templates(),
                                              input: [{ [kind]: data }] }, turn.signal);
  if (turn.current()) showBars(result.labels, result.data[0].scores);
}

async function handle(file) {
  const turn = mediaTurn();
  showError(null);
  lastFile = file;
  $("bars").replaceChildren(); $("caption-row").hidden = true; $("transcript-row").hidden = true;
  $("preview").replaceChildren();
  const kind = kindOf(file);
  if (!takes(kind)) {
    const what = kind ? `this model cannot take an ${kind} file` : "not an image or audio file";
    showError(`${file.name}: ${what}; it takes ${taken().join(" or ")} files`);
    document.body.dataset.state = "done";
    return;
  }
  const data = await readBase64(file);
  if (!turn.current()) return;
  const preview = kind === "image" ? document.createElement("img") : document.createElement("audio");
  preview.src = URL.createObjectURL(file); if (kind === "audio") preview.controls = true;
  $("preview").replaceChildren(preview);
  const jobs = [classify(kind, data, turn)];
  if (kind === "image" && serves("captions")) {
    jobs.push(call("/v1/captions", { model: health.model, input: [{ image: data }] }, turn.signal).then((r) => {
      if (!turn.current()) return;
      $("caption").textContent = r.data[0].caption; $("caption-row").hidden = false;
    }));
  }
  if (kind === "audio" && serves("audio/transcriptions")) {
    const form = new FormData();
    form.append("file", file); form.append("model", health.model); form.append("response_format", "verbose_json");
    form.append("timestamp_granularities[]", "segment");
    jobs.push(call("/v1/audio/transcriptions", form, turn.signal).then((r) => {
      if (!turn.current()) return;
      $("transcript").textContent = r.text;
      $("segments").replaceChildren(...(r.segments || []).map((s) => {
        const row = document.createElement("tr");
        for (const text of [clock(s.start), clock(s.end), s.text]) {
          const cell = document.createElement("td"); cell.textContent = text; row.append(cell);
        }
        return row;
      }));
      $("transcript-row").hidden = false;
    }));
  }
  const outcomes = await Promise.allSettled(jobs);
  if (!turn.current()) return;
  const failed = outcomes.find((o) => o.status === "rejected");
  showError(failed ? failed.reason : null);
  document.body.dataset.state = "done";
}

async function complete() {
  const turn = promptTurn();
  showError(null);
  $("completion").textContent = "…";
  const prompt = $("prompt").value;
  try {
    const r = await call("/v1/completions", { model: health.model, prompt,
      max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value) }, turn.signal);
    if (turn.current()) $("completion").textContent = prompt + r.choices[0].text;
  } catch (e) { if (turn.current()) { $("completion").textContent = ""; showError(e); } }
}

async function start() {
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault(); drop.classList.remove("over");
    if (e.dataTransfer.files.length) handle(e.dataTransfer.files[0]).catch(showError);
  });
  $("file").addEventListener("change", () => { if ($("file").files.length) handle($("file").files[0]).catch(showError); });
  for (const id of ["labels", "templates"]) {
    $(id).addEventListener("change", () => { if (lastFile) handle(lastFile).catch(showError); });
  }
  $("complete").addEventListener("click", complete);
  health = await (await fetch("/health")).json();
  $("model").textContent = health.model + " — " + health.routes.join(", ");
  const kinds = taken();  // only the controls this model's routes use
  $("media-panel").hidden = !kinds.length;
  $("classify-controls").hidden = !serves("classify");
  if (kinds.length === 1) $("drop-what").textContent = `an ${kinds[0]} file`;
  $("file").accept = kinds.map((k) => k + "/*").join(",");
  $("prompt-panel").hidden = !serves("completions");
  document.body.dataset.ready = "true";
}

start().catch(showError);
