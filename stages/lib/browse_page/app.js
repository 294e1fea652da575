// The results page: window.BROWSE_DATA (data.js, written by stages/browse.py) rendered in the
// browser, offline. Only the visible rows are in the DOM (page_size per page, lazy thumbnails),
// so filtering and sorting 10,000 samples stays a few array passes.
"use strict";
const DATA = window.BROWSE_DATA;
const RUNS = DATA.runs;
const TITLE = Object.fromEntries(RUNS.map(r => [r.name, r.title]));
const $ = id => document.getElementById(id);

const FILTERS = {
  all: ["every sample", () => true],
  worse: [`worse after fine-tuning (${TITLE[DATA.main]} CER > ${TITLE[DATA.before]})`,
          s => cmp(s, DATA.main, DATA.before) > 0],
  better: [`better after fine-tuning (${TITLE[DATA.main]} CER < ${TITLE[DATA.before]})`,
           s => cmp(s, DATA.main, DATA.before) < 0],
  empty: ["an empty prediction (any run)", s => Object.values(s.runs).some(r => r.p === "")],
  failed: ["a failed sample (any run)", s => Object.values(s.runs).some(r => r.e)],
  truncated: ["a truncated prediction (any run)", s => Object.values(s.runs).some(r => r.r === "length")],
};

// Failure-mode flags and tags (stages/lib/failures.py, breakdowns.py): keys by position, so that
// no value of the data ever lands in an attribute or the URL unescaped.
(DATA.flags || []).forEach((f, i) => {
  FILTERS[`flag${i}`] = [`failure mode: ${f.replace(/_/g, " ")} (any run)`, s => Object.values(s.runs).some(r => (r.g || []).includes(f))];
});
(DATA.tags || []).forEach((t, i) => { FILTERS[`tag${i}`] = [`tag: ${t}`, s => (s.t || []).includes(t)]; });

const state = {q: "", filter: "all", sort: "order", a: DATA.before, b: DATA.main, compare: false, pos: 0};
let list = [];   // the samples shown: filtered, then sorted

function cer(s, run) {
  const r = s.runs[run];
  return r && typeof r.c === "number" ? r.c : null;
}

function confidence(s, run) {   // NaN when the run recorded none for this sample
  const r = s.runs[run];
  return r && typeof r.k === "number" ? r.k : NaN;
}

function cmp(s, a, b) {   // CER(a) - CER(b), or NaN when either is missing
  const x = cer(s, a), y = cer(s, b);
  return x === null || y === null ? NaN : x - y;
}

function esc(text) {
  return String(text).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}

// Python's opcodes count code points; Array.from splits a string the same way (not UTF-16 units).
function diffHTML(label, pred, ops) {
  const ref = Array.from(label), out = Array.from(pred);
  let html = "", i = 0;
  for (const [i1, i2, j1, j2] of ops) {
    html += esc(ref.slice(i, i1).join(""));
    const a = esc(ref.slice(i1, i2).join("")), b = esc(out.slice(j1, j2).join(""));
    if (a && b) html += `<span class="sub"><del title="label">${a}</del><ins title="prediction">${b}</ins></span>`;
    else if (a) html += `<del title="missing from the prediction">${a}</del>`;
    else html += `<ins title="not in the label">${b}</ins>`;
    i = i2;
  }
  html += esc(ref.slice(i).join(""));
  return html || '<span class="muted">(both empty)</span>';
}

function fmt(x) {
  return typeof x === "number" ? x.toFixed(4) : "n/a";
}

function prediction(s, run) {
  const r = s.runs[run];
  if (!r) return '<div class="muted">not evaluated by this run</div>';
  if (r.e) return `<div class="text muted">no prediction</div><div class="figs"><span class="tag failed">failed</span> ${esc(r.e)}</div>`;
  const tags = (r.p === "" ? '<span class="tag empty">empty</span>' : "") +
               (r.r === "length" ? '<span class="tag truncated" title="cut by max_tokens">truncated</span>' : "") +
               (r.g || []).filter(f => f !== "empty" && f !== "truncated")
                 .map(f => `<span class="tag flag" title="failure mode">${esc(f.replace(/_/g, " "))}</span>`).join("");
  const conf = typeof r.k === "number" ? ` · confidence <span class="conf">${esc(r.k.toFixed(3))}</span>` : "";
  return `<div class="text">${diffHTML(s.label, r.p, r.d)}</div>` +
         `<div class="figs">CER <span class="cer" data-run="${esc(run)}" data-value="${esc(r.c)}">${fmt(r.c)}</span>` +
         ` · F1 <span class="f1" data-run="${esc(run)}" data-value="${esc(r.f)}">${fmt(r.f)}</span>${conf}${tags}</div>`;
}

function image(s) {
  const img = s.thumb ? `<img loading="lazy" src="${esc(s.thumb)}" alt="${esc(s.image_path)}">`
                      : '<span class="muted">(image unreadable)</span>';
  // a relative path as a URL: each segment encoded (a '#', '?' or '%' in a file name is not a URL's)
  const href = s.full;   // already a quoted relative URL (stages/browse.py full_size_link)
  const full = s.full ? ` <a href="${esc(href)}" target="_blank">full size</a>` : "";
  return `${img}<div class="figs">${esc(s.image_path)}${full}</div>`;
}

function readHash() {
  const h = new URLSearchParams(location.hash.slice(1));
  for (const key of ["q", "filter", "sort", "a", "b"]) if (h.has(key)) state[key] = h.get(key);
  if (h.has("mode")) state.compare = h.get("mode") === "compare";
  if (h.has("pos")) state.pos = Math.max(0, parseInt(h.get("pos"), 10) || 0);
  if (!(state.filter in FILTERS)) state.filter = "all";
  for (const key of ["a", "b"]) if (!(state[key] in TITLE)) state[key] = key === "a" ? DATA.before : DATA.main;
}

function writeHash() {
  const h = new URLSearchParams({sort: state.sort, filter: state.filter, a: state.a, b: state.b, pos: state.pos});
  if (state.q) h.set("q", state.q);
  if (state.compare) h.set("mode", "compare");
  history.replaceState(null, "", "#" + h.toString());
}

function sortKey() {   // a function sample -> number (missing: NaN, always last), and the direction
  const [kind, run, dir] = state.sort.split(":");
  if (kind === "cer" && run in TITLE) return [s => { const c = cer(s, run); return c === null ? NaN : c; }, dir];
  if (kind === "diff") return [s => cmp(s, state.a, state.b), run];   // diff:desc / diff:asc
  if (kind === "conf" && run in TITLE) return [s => confidence(s, run), dir];
  return [s => s.i, "asc"];
}

function rebuild() {
  const q = state.q.toLowerCase();
  const keep = FILTERS[state.filter][1];
  list = DATA.samples.filter(s => keep(s) && (!q || s.label.toLowerCase().includes(q) ||
    Object.values(s.runs).some(r => r.p && r.p.toLowerCase().includes(q))));
  const [key, dir] = sortKey();
  const sign = dir === "desc" ? -1 : 1;
  const keyed = list.map(s => [key(s), s]);
  keyed.sort((x, y) => {
    const a = x[0], b = y[0];
    if (Number.isNaN(a) || Number.isNaN(b)) return Number.isNaN(a) - Number.isNaN(b) || x[1].i - y[1].i;
    return sign * (a - b) || x[1].i - y[1].i;   // ties keep the input order
  });
  list = keyed.map(p => p[1]);
  state.pos = Math.min(state.pos, Math.max(0, list.length - 1));
}

function renderTable() {
  const size = DATA.page_size, start = Math.floor(state.pos / size) * size;
  const rows = list.slice(start, start + size).map((s, k) => {
    const cells = RUNS.map(r => `<td class="pred" data-run="${esc(r.name)}">${prediction(s, r.name)}</td>`).join("");
    return `<tr class="sample${start + k === state.pos ? " current" : ""}" data-index="${s.i}" data-pos="${start + k}">` +
           `<td class="num">${s.i}</td><td class="image">${image(s)}</td><td class="label text">${esc(s.label)}</td>${cells}</tr>`;
  }).join("");
  const head = RUNS.map(r => `<th>${esc(r.title)}</th>`).join("");
  $("view").innerHTML = `<table class="samples"><thead><tr><th>#</th><th>image</th><th>label (normalized, as scored)</th>${head}</tr></thead>` +
                        `<tbody>${rows}</tbody></table>`;
  const pages = Math.max(1, Math.ceil(list.length / size));
  return `rows ${list.length ? start + 1 : 0}-${Math.min(start + size, list.length)}, page ${Math.floor(start / size) + 1} of ${pages}`;
}

function renderCompare() {
  const s = list[state.pos];
  if (!s) { $("view").innerHTML = '<p class="muted">no sample matches</p>'; return "no sample"; }
  const delta = cmp(s, state.a, state.b);
  const side = run => `<div class="side" data-run="${esc(run)}"><h3>${esc(TITLE[run])}</h3>${prediction(s, run)}</div>`;
  $("view").innerHTML = `<div class="sample compare" data-index="${s.i}"><div class="big">${image(s)}</div>` +
    `<p class="label text">${esc(s.label)}</p><div class="pair">${side(state.a)}${side(state.b)}</div>` +
    `<p>CER ${esc(TITLE[state.a])} − ${esc(TITLE[state.b])}: <span id="delta" class="${delta > 0 ? "worse" : delta < 0 ? "better" : ""}">` +
    `${Number.isNaN(delta) ? "n/a" : delta.toFixed(4)}</span></p></div>`;
  return `sample #${s.i}, ${state.pos + 1} of ${list.length}`;
}

function render() {
  const where = state.compare ? renderCompare() : renderTable();
  const count = $("count");
  count.dataset.shown = list.length;
  count.dataset.total = DATA.samples.length;
  count.textContent = `${list.length} of ${DATA.samples.length} samples · ${where}`;
  writeHash();
}

function move(step) {
  if (!list.length) return;
  const size = DATA.page_size, before = Math.floor(state.pos / size);
  state.pos = Math.min(list.length - 1, Math.max(0, state.pos + step));
  if (state.compare || Math.floor(state.pos / size) !== before) { render(); window.scrollTo(0, 0); return; }
  document.querySelectorAll("tr.sample.current").forEach(tr => tr.classList.remove("current"));
  const row = document.querySelector(`tr.sample[data-pos="${state.pos}"]`);
  if (row) { row.classList.add("current"); row.scrollIntoView({block: "nearest"}); }
  writeHash();
}

function fillControls() {
  $("runs").innerHTML = "<tr><th>run</th><th>CER</th><th>F1</th><th>scored</th><th>failed</th><th>truncated</th></tr>" +
    RUNS.map(r => `<tr data-run="${esc(r.name)}"><td>${esc(r.title)}</td><td class="num">${fmt(r.overall_cer)}</td>` +
      `<td class="num">${fmt(r.overall_f1)}</td><td class="num">${esc(r.scored_samples ?? "n/a")}</td>` +
      `<td class="num">${esc(r.failed_samples ?? "n/a")}</td><td class="num">${esc(r.truncated_predictions ?? "n/a")}</td></tr>`).join("");
  $("filter").innerHTML = Object.entries(FILTERS).map(([k, [text]]) => `<option value="${k}">${esc(text)}</option>`).join("");
  $("sort").innerHTML = '<option value="order">input order</option>' +
    RUNS.map(r => `<option value="cer:${esc(r.name)}:desc">${esc(r.title)}: CER, highest first</option>` +
                  `<option value="cer:${esc(r.name)}:asc">${esc(r.title)}: CER, lowest first</option>`).join("") +
    '<option value="diff:desc">CER of A − B, largest first</option><option value="diff:asc">CER of A − B, smallest first</option>' +
    RUNS.filter(r => r.confidence_source).map(r =>
      `<option value="conf:${esc(r.name)}:asc">${esc(r.title)}: confidence, lowest first (review order)</option>`).join("");
  const runOptions = RUNS.map(r => `<option value="${esc(r.name)}">${esc(r.title)}</option>`).join("");
  $("a").innerHTML = runOptions;
  $("b").innerHTML = runOptions;
}

function syncControls() {
  $("q").value = state.q;
  for (const key of ["filter", "sort", "a", "b"]) $(key).value = state[key];
  $("compare").checked = state.compare;
}

function onChange() {
  Object.assign(state, {q: $("q").value, filter: $("filter").value, sort: $("sort").value, a: $("a").value,
                        b: $("b").value, compare: $("compare").checked, pos: 0});
  rebuild();
  render();
}

fillControls();
readHash();
syncControls();
const viewStart = performance.now();
rebuild();
render();
document.body.dataset.viewMs = (performance.now() - viewStart).toFixed(1);   // filter + sort + draw: one click's cost
for (const id of ["filter", "sort", "a", "b", "compare"]) $(id).addEventListener("change", onChange);
$("q").addEventListener("input", onChange);
$("prev").addEventListener("click", () => move(state.compare ? -1 : -DATA.page_size));
$("next").addEventListener("click", () => move(state.compare ? 1 : DATA.page_size));
$("jump").addEventListener("change", () => {
  const target = list.findIndex(s => s.i === parseInt($("jump").value, 10));
  if (target >= 0) { state.pos = target; render(); }
});
document.addEventListener("keydown", e => {
  if (e.target.matches("input, select")) return;
  if (e.key === "j" || e.key === "ArrowRight") { move(1); e.preventDefault(); }
  if (e.key === "k" || e.key === "ArrowLeft") { move(-1); e.preventDefault(); }
});
document.body.dataset.ready = "1";   // for headless checks: the first render is done
document.body.dataset.renderMs = Math.round(performance.now());   // since navigation start (make bench)
