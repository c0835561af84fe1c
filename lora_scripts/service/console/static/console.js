// The console's few behaviours: fetch the JSON API, render, poll. No framework, no build step.
"use strict";

async function api(method, url, body, isForm) {
  const opts = {method, credentials: "same-origin", headers: {"X-Console": "1"}};
  if (body !== undefined) {
    if (isForm) opts.body = body;
    else { opts.body = JSON.stringify(body); opts.headers["Content-Type"] = "application/json"; }
  }
  const res = await fetch(url, opts);
  let data = null;
  try { data = await res.json(); } catch (e) { data = null; }
  return {ok: res.ok, status: res.status, data};
}

function errorText(res) {
  const d = res.data && res.data.detail;
  if (res.status === 401) return "Sign in first (token at the top right).";
  if (Array.isArray(d)) return d.map(e => e.msg).join("; ");
  return (d || ("HTTP " + res.status));
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function fmtTime(t) { return t ? new Date(t * 1000).toLocaleString() : ""; }

// --- index: jobs and datasets ----------------------------------------------------------------------------------
async function refreshIndex() {
  const jobs = await api("GET", "/api/jobs?limit=100");
  const body = document.querySelector("#jobs tbody");
  if (jobs.ok) {
    body.replaceChildren(...(jobs.data.length ? jobs.data.map(j => el("tr", {"data-job": j.id},
      el("td", {}, el("a", {href: "/jobs/" + j.id, text: j.name})),
      el("td", {}, el("span", {class: "state " + j.state, text: j.state}),
        ...(j.state === "failed" && j.error ? [el("div", {class: "error reason", text: j.error})] : [])),
      el("td", {class: "progress-cell", "data-progress": j.id}),
      el("td", {class: "loss-cell", "data-loss": j.id}),
      el("td", {text: fmtTime(j.created_at)}))) : [el("tr", {}, el("td", {colspan: 5, text: "no jobs yet"}))]));
    // progress of the running jobs, and the final loss of the latest finished ones
    const shown = jobs.data.filter(j => j.state === "running").slice(0, 10)
      .concat(jobs.data.filter(j => j.state === "succeeded" || j.state === "cancelled").slice(0, 20));
    for (const j of shown) {
      api("GET", "/api/jobs/" + j.id).then(r => {
        if (!r.ok) return;
        const p = document.querySelector(`[data-progress="${j.id}"]`), l = document.querySelector(`[data-loss="${j.id}"]`);
        if (p) p.textContent = r.data.step + (r.data.total_steps ? " / " + r.data.total_steps : "") + " steps";
        if (l && r.data.loss != null) l.textContent = r.data.loss.toFixed(4);
      });
    }
  }
  const ds = await api("GET", "/api/datasets");
  if (ds.ok) {
    document.getElementById("datasets").replaceChildren(...(ds.data.length ? ds.data.map(d => el("li", {},
      el("a", {href: "/datasets/" + d.id}, ...(d.images[0] ? [el("img", {src: d.images[0].url, alt: ""})] : []),
        el("strong", {text: d.name})), el("span", {text: ` ${d.count} images, ${d.captioned} captioned`}))) :
      [el("li", {text: "no datasets yet"})]));
  }
}

function initIndex() {
  document.getElementById("new-dataset").addEventListener("submit", async ev => {
    ev.preventDefault();
    const name = ev.target.name.value.trim();
    const res = await api("POST", "/api/datasets", {name});
    if (res.ok) location.href = "/datasets/" + res.data.id;
    else document.querySelector('[data-error="name"]').textContent = errorText(res);
  });
  refreshIndex();
  setInterval(refreshIndex, 2000);
}

// --- a dataset: upload, label, check, captions ------------------------------------------------------------------
function initDataset(id) {
  const status = document.getElementById("status");
  const say = (text, bad) => { status.textContent = text; status.className = bad ? "status error" : "status"; };
  async function load() {
    const res = await api("GET", "/api/datasets/" + id);
    if (!res.ok) return say(errorText(res), true);
    render(res.data);
  }
  function render(d) {
    document.getElementById("summary").textContent = `${d.count} images, ${d.captioned} captioned` +
      (d.sidecar_only ? `; ${d.sidecar_only} more have a .txt sidecar caption that training will not use while ` +
       "metadata.csv exists: run auto-label with \".txt sidecars\" to merge them in" : "");
    document.getElementById("images").replaceChildren(...d.images.map(img => el("figure", {},
      el("img", {src: img.url + "?t=" + Date.now(), alt: img.name, loading: "lazy"}),
      el("figcaption", {text: img.name}),
      (() => { const t = el("textarea", {"data-name": img.name, rows: 2, "aria-label": "caption of " + img.name});
               t.value = img.caption || ""; return t; })())));
  }
  document.getElementById("upload").addEventListener("submit", async ev => {
    ev.preventDefault();
    const files = document.getElementById("files").files;
    if (!files.length) return say("choose files first", true);
    const form = new FormData();
    for (const f of files) form.append("files", f);
    say("uploading…");
    const res = await api("POST", `/api/datasets/${id}/files`, form, true);
    if (!res.ok) return say(errorText(res), true);
    say(`uploaded ${res.data.written.length} files`);
    render(res.data.dataset);
  });
  document.getElementById("label").addEventListener("submit", async ev => {
    ev.preventDefault();
    const f = ev.target;
    if ((f.backend.value === "caption" || f.backend.value === "tagger") && !f.model.value)
      return say("this back-end needs a model folder under the home's models/ (e.g. models/blip)", true);
    say("labelling…");
    const res = await api("POST", `/api/datasets/${id}/label`, {backend: f.backend.value, model: f.model.value || null,
      trigger: f.trigger.value || null, overwrite: f.overwrite.checked});
    if (!res.ok) return say(errorText(res), true);
    say("labelled: " + res.data.output.join(" "));
    render(res.data.dataset);
  });
  document.getElementById("check").addEventListener("submit", async ev => {
    ev.preventDefault();
    const res = await api("POST", `/api/datasets/${id}/check`, {resolution: Number(ev.target.resolution.value)});
    if (!res.ok) return say(errorText(res), true);
    const r = res.data;
    say(`data check: ${r.ok ? "ok" : "FAILED"}, ${r.num_samples} samples, ${r.errors} errors, ${r.warnings} warnings`, !r.ok);
    document.getElementById("report").replaceChildren(el("ul", {class: "report"},
      ...r.findings.map(f => el("li", {class: f.level, text: `${f.level}: ${f.message}`}))));
  });
  document.getElementById("captions").addEventListener("submit", async ev => {
    ev.preventDefault();
    const captions = {};
    document.querySelectorAll("#images textarea").forEach(t => { captions[t.dataset.name] = t.value; });
    const res = await api("PUT", `/api/datasets/${id}/captions`, {captions});
    if (!res.ok) return say(errorText(res), true);
    say("captions saved");
    render(res.data);
  });
  load();
}

// --- the job form, validated as you type ------------------------------------------------------------------------
function formBody(form) {
  const config = {};
  form.querySelectorAll("[data-config]").forEach(input => {
    const v = input.value.trim();
    if (v === "" || input.disabled) return;  // a field of the other task
    if (input.name === "sample_prompts") config[input.name] = [v];
    else if (input.type === "number" || input.name === "learning_rate") config[input.name] = isNaN(Number(v)) ? v : Number(v);
    else config[input.name] = v;
  });
  const dataset = form.dataset_id.disabled ? null : form.dataset_id.value || null;
  return {name: form.name.value.trim() || null, dataset_id: dataset, config_yaml: form.config_yaml.value, config};
}

function showErrors(form, errors) {
  form.querySelectorAll("[data-error]").forEach(s => { s.textContent = ""; });
  const other = [];
  for (const e of errors) {
    const loc = e.loc.filter(p => p !== "body");
    const key = loc[0] === "config" ? "config." + loc[1] : loc[0];
    const slot = form.querySelector(`[data-error="${key}"]`);
    if (slot) slot.textContent = e.msg; else other.push(loc.join(".") + ": " + e.msg);
  }
  document.getElementById("other-errors").textContent = other.join("\n");
}

// the task selector: only the fields of the chosen task are shown and sent; the demo's defaults fill them
function showTask(form, task, fill) {
  form.querySelectorAll("[data-task]").forEach(label => {
    const mine = label.dataset.task === task;
    label.hidden = !mine;
    label.querySelectorAll("input, select").forEach(input => { input.disabled = !mine; });
  });
  const all = JSON.parse(document.getElementById("form-defaults").textContent || "{}");
  const defaults = task === "text" ? (all.text || {}) : all;
  if (!fill) return;
  for (const [key, value] of Object.entries(defaults)) {
    const input = form.elements[key];
    if (input && typeof value !== "object" && key !== "task") input.value = value;
  }
}

function initJobForm() {
  const form = document.getElementById("job-form"), valid = document.getElementById("valid");
  let timer = null;
  showTask(form, form.task.value, false);
  form.task.addEventListener("change", () => showTask(form, form.task.value, true));
  async function check() {
    const res = await api("POST", "/api/jobs/validate", formBody(form));
    if (res.status === 422) { showErrors(form, res.data.detail); valid.textContent = "fix the fields marked in red"; }
    else if (res.ok) { showErrors(form, []); valid.textContent = "config is valid"; }
    else valid.textContent = errorText(res);
    return res.ok;
  }
  form.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(check, 400); });
  form.addEventListener("change", () => { clearTimeout(timer); timer = setTimeout(check, 100); });
  form.addEventListener("submit", async ev => {
    ev.preventDefault();
    const res = await api("POST", "/api/jobs", formBody(form));
    if (res.ok) location.href = "/jobs/" + res.data.id;
    else if (res.status === 422) showErrors(form, res.data.detail);
    else valid.textContent = errorText(res);
  });
  check();
}

// --- one job: progress, loss chart, samples, log, buttons --------------------------------------------------------
function drawLoss(canvas, rows) {
  const ctx = canvas.getContext("2d"), w = canvas.width, h = canvas.height, pad = 36;
  ctx.clearRect(0, 0, w, h);
  ctx.strokeStyle = "#999"; ctx.strokeRect(pad, 8, w - pad - 8, h - pad - 8);
  if (rows.length < 1) { ctx.fillStyle = "#666"; ctx.fillText("no loss logged yet", pad + 10, h / 2); return; }
  const xs = rows.map(r => r.step), ys = rows.map(r => r.loss);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-9);
  const X = x => pad + (x - x0) / (x1 - x0) * (w - pad - 8), Y = y => h - pad - (y - y0) / (y1 - y0) * (h - pad - 16);
  ctx.strokeStyle = "#2a6fdb"; ctx.lineWidth = 2; ctx.beginPath();
  rows.forEach((r, i) => i ? ctx.lineTo(X(r.step), Y(r.loss)) : ctx.moveTo(X(r.step), Y(r.loss)));
  ctx.stroke();
  ctx.fillStyle = "#333"; ctx.font = "11px sans-serif";
  ctx.fillText(y1.toFixed(3), 2, 16); ctx.fillText(y0.toFixed(3), 2, h - pad);
  ctx.fillText("step " + x0, pad, h - pad + 16); ctx.fillText("step " + x1, w - 60, h - pad + 16);
}

function initJob(id) {
  let offset = 0, done = false;
  const log = document.getElementById("log");
  async function tick() {
    const res = await api("GET", "/api/jobs/" + id);
    if (!res.ok) return;
    const j = res.data;
    const state = document.getElementById("state");
    state.textContent = j.state + (j.cancel_requested && j.state === "running" ? " (stopping…)" : "");
    state.className = "state " + j.state;
    const pct = j.total_steps ? Math.min(100, 100 * j.step / j.total_steps) : (j.state === "succeeded" ? 100 : 0);
    document.getElementById("bar").style.width = pct + "%";
    document.getElementById("progress-text").textContent = `step ${j.step}` + (j.total_steps ? ` of ${j.total_steps}` : "") +
      (j.loss != null ? `, loss ${j.loss.toFixed(4)}` : "") + (j.seconds_per_step ? `, ${j.seconds_per_step.toFixed(2)} s/step` : "") +
      (j.attempts > 1 ? `, attempt ${j.attempts}` : "");
    document.getElementById("error").textContent = j.error || "";
    document.getElementById("cancel").disabled = !(j.state === "queued" || j.state === "running");
    document.getElementById("resume").disabled = !(j.state === "cancelled" || j.state === "failed");
    document.getElementById("downloads").replaceChildren(...j.artifacts.map(a => el("li", {},
      el("a", {href: `/api/jobs/${id}/artifacts/${a.path}`, download: "", text: a.path}), ` (${(a.size / 1024).toFixed(1)} KB)`)));
    document.getElementById("samples").replaceChildren(...j.samples.slice(-6).map(s => el("figure", {},
      el("img", {src: `/api/jobs/${id}/artifacts/${s.path}`, alt: s.path}), el("figcaption", {text: s.path.split("/").pop()}))));
    const loss = await api("GET", `/api/jobs/${id}/loss`);
    if (loss.ok) drawLoss(document.getElementById("chart"), loss.data);
    const chunk = await api("GET", `/api/jobs/${id}/log?offset=${offset}`);
    if (chunk.ok && chunk.data.text) {
      offset = chunk.data.offset;
      log.textContent = (log.textContent + chunk.data.text).slice(-20000);
      log.scrollTop = log.scrollHeight;
    }
    done = ["succeeded", "failed", "cancelled"].includes(j.state);
  }
  async function act(what) {
    const res = await api("POST", `/api/jobs/${id}/${what}`);
    document.getElementById("error").textContent = res.ok ? "" : errorText(res);
    tick();
  }
  document.getElementById("cancel").addEventListener("click", () => act("cancel"));
  document.getElementById("resume").addEventListener("click", () => act("resume"));
  tick();
  setInterval(() => { if (!done || document.getElementById("resume").disabled === false) tick(); }, 1000);
}
