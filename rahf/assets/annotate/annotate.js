// rahf annotate: one image at a time; points, misaligned words and four 1-5 scores, as in the paper's Fig. 1.
"use strict";

const SCORES = ["plausibility", "alignment", "aesthetics", "overall"];
const KINDS = ["implausibility", "misalignment"];
const $ = (id) => document.getElementById(id);
const state = { annotator: null, index: 0, total: 0, item: null, points: [], words: new Set(), scores: {},
                kind: KINDS[0], activeRow: 0 };

async function api(path, body) {
  const options = body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" },
                                               body: JSON.stringify(body) };
  const response = await fetch(path, options);
  const answer = await response.json();
  if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
  return answer;
}

function say(text, kind) {
  const box = $("message");
  box.textContent = text;
  box.className = kind || "";
}

function setKind(kind) {
  state.kind = kind;
  for (const k of KINDS) $(`kind-${k}`).classList.toggle("active", k === kind);
}

function renderPoints() {
  const layer = $("points");
  layer.replaceChildren();
  state.points.forEach((p, i) => {
    const dot = document.createElement("div");
    dot.className = `point ${p.kind}`;
    dot.dataset.index = i;
    dot.title = `${p.kind} (click to remove)`;
    dot.style.left = `${(100 * p.x) / state.item.width}%`;
    dot.style.top = `${(100 * p.y) / state.item.height}%`;
    dot.addEventListener("click", (event) => {
      event.stopPropagation();
      state.points.splice(i, 1);
      renderPoints();
    });
    layer.appendChild(dot);
  });
  const counts = KINDS.map((k) => `${state.points.filter((p) => p.kind === k).length} ${k}`);
  $("point-count").textContent = counts.join(", ");
}

function renderWords() {
  for (const span of $("prompt").querySelectorAll(".word")) {
    span.classList.toggle("misaligned", state.words.has(Number(span.dataset.index)));
  }
}

function renderScores() {
  $("scores").querySelectorAll(".score-row").forEach((row, r) => {
    row.classList.toggle("active", r === state.activeRow);
    for (const button of row.querySelectorAll(".rate")) {
      button.classList.toggle("selected", state.scores[row.dataset.name] === Number(button.dataset.value));
    }
  });
}

function buildScores() {
  const box = $("scores");
  box.replaceChildren();
  SCORES.forEach((name, r) => {
    const row = document.createElement("div");
    row.className = "score-row";
    row.dataset.name = name;
    row.id = `score-${name}`;
    const label = document.createElement("span");
    label.className = "name";
    label.textContent = name;
    row.appendChild(label);
    for (let v = 1; v <= 5; v++) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "rate";
      button.dataset.value = v;
      button.textContent = v;
      button.addEventListener("click", (event) => { event.stopPropagation(); rate(r, v); });
      row.appendChild(button);
    }
    row.addEventListener("click", () => { state.activeRow = r; renderScores(); });
    box.appendChild(row);
  });
}

function rate(row, value) {
  state.scores[SCORES[row]] = value;
  state.activeRow = Math.min(row + 1, SCORES.length - 1);
  renderScores();
}

function showProgress(info) {
  state.total = info.total;
  const where = state.item ? `image ${state.index + 1} of ${info.total}` : "";
  $("progress").textContent = `${where} · ${info.done} of ${info.total} done`;
}

async function load(index) {
  const item = await api(`/api/item/${index}?annotator=${encodeURIComponent(state.annotator)}`);
  state.item = item;
  state.index = item.index;
  const existing = item.existing;
  state.points = existing ? existing.points.map((p) => ({ ...p })) : [];
  state.words = new Set(existing ? existing.misaligned_word_indices : []);
  state.scores = existing ? { ...existing.scores } : {};
  state.activeRow = 0;
  // Shown as large as fits (up to 640 x 80% of the window), aspect kept, so that clicks map to its own pixels.
  const fit = Math.min(Math.min(640, 0.56 * window.innerWidth) / item.width, (0.8 * window.innerHeight) / item.height);
  $("image").style.width = `${Math.round(item.width * fit)}px`;
  $("image").style.height = `${Math.round(item.height * fit)}px`;
  $("image").src = item.image_url;
  const prompt = $("prompt");
  prompt.replaceChildren();
  item.words.forEach((word, i) => {
    const span = document.createElement("span");
    span.className = "word";
    span.dataset.index = i;
    span.textContent = word;
    span.addEventListener("click", () => {
      state.words.has(i) ? state.words.delete(i) : state.words.add(i);
      renderWords();
    });
    prompt.appendChild(span);
    prompt.appendChild(document.createTextNode(" "));
  });
  renderPoints();
  renderWords();
  renderScores();
  showProgress(item);
  say(existing ? "you annotated this image before: submitting replaces it" : (item.skipped ? "skipped before" : ""));
}

async function start() {
  const name = $("annotator").value.trim();
  if (!name) return say("enter your name first", "error");
  try {
    const info = await api(`/api/state?annotator=${encodeURIComponent(name)}`);
    state.annotator = name;
    localStorage.setItem("rahf-annotator", name);
    const url = new URL(window.location);
    url.searchParams.set("annotator", name);
    window.history.replaceState(null, "", url);
    $("main").hidden = false;
    await load(Math.min(info.resume, info.total - 1));
    if (info.resume >= info.total) say(`all ${info.total} images are done; you can still go back and edit`, "ok");
  } catch (err) {
    say(err.message, "error");
  }
}

async function go(delta) {
  const target = state.index + delta;
  if (target < 0 || target >= state.total) return;
  try { await load(target); } catch (err) { say(err.message, "error"); }
}

async function afterSave(info, text) {
  const target = state.index + 1 < info.total ? state.index + 1 : info.resume;
  if (target >= info.total) {
    showProgress(info);
    return say(`${text}; all ${info.total} images are done`, "ok");
  }
  await load(target);
  say(text, "ok");
}

async function submit() {
  const missing = SCORES.filter((name) => !(name in state.scores));
  if (missing.length) return say(`rate ${missing.join(", ")} first`, "error");
  const body = { annotator: state.annotator, index: state.index, points: state.points,
                 misaligned_word_indices: [...state.words].sort((a, b) => a - b), scores: state.scores };
  try {
    const info = await api("/api/annotation", body);
    await afterSave(info, `saved image ${body.index + 1}`);
  } catch (err) {
    say(`not saved: ${err.message}`, "error");
  }
}

async function skip() {
  try {
    const info = await api("/api/skip", { annotator: state.annotator, index: state.index });
    await afterSave(info, `skipped image ${state.index + 1}`);
  } catch (err) {
    say(err.message, "error");
  }
}

function addPoint(event) {
  const image = $("image");
  const box = image.getBoundingClientRect();
  const w = state.item.width, h = state.item.height;
  // Pixels of the image itself, whatever size it is shown at; kept strictly inside [0, w) x [0, h).
  const x = Math.min(Math.max(((event.clientX - box.left) * w) / box.width, 0), w - 0.01);
  const y = Math.min(Math.max(((event.clientY - box.top) * h) / box.height, 0), h - 0.01);
  state.points.push({ x: Math.round(x * 100) / 100, y: Math.round(y * 100) / 100, kind: state.kind });
  renderPoints();
}

function onKey(event) {
  if (event.target.tagName === "INPUT") {
    if (event.key === "Enter") start();
    return;
  }
  if (!state.item) return;
  const key = event.key;
  if (key >= "1" && key <= "5") rate(state.activeRow, Number(key));
  else if (key === "i") setKind("implausibility");
  else if (key === "m") setKind("misalignment");
  else if (key === "u") { state.points.pop(); renderPoints(); }
  else if (key === "Enter") submit();
  else if (key === "s") skip();
  else if (key === "ArrowLeft") go(-1);
  else if (key === "ArrowRight") go(1);
  else if (key === "Tab") {
    state.activeRow = (state.activeRow + (event.shiftKey ? SCORES.length - 1 : 1)) % SCORES.length;
    renderScores();
  } else return;
  event.preventDefault();
}

async function init() {
  buildScores();
  setKind(KINDS[0]);
  $("image").addEventListener("click", addPoint);
  $("points").addEventListener("click", (event) => { if (event.target.id === "points") addPoint(event); });
  for (const k of KINDS) $(`kind-${k}`).addEventListener("click", () => setKind(k));
  $("undo").addEventListener("click", () => { state.points.pop(); renderPoints(); });
  $("start").addEventListener("click", start);
  $("submit").addEventListener("click", submit);
  $("skip").addEventListener("click", skip);
  $("prev").addEventListener("click", () => go(-1));
  $("next").addEventListener("click", () => go(1));
  document.addEventListener("keydown", onKey);
  const config = await api("/api/config");
  const name = new URLSearchParams(window.location.search).get("annotator")
    || localStorage.getItem("rahf-annotator") || config.annotator;
  if (name) {
    $("annotator").value = name;
    await start();
  } else {
    say("enter your name and press start", "");
  }
}

init();
