// cmserve playground: plain browser JavaScript, no build step, talks only to the server that served it.
"use strict";

(() => {
  const KEY_STORAGE = "cmserve.apiKey"; // sessionStorage: gone when the tab closes
  const STATS_INTERVAL_MS = 2000;
  const COMPARE_STEPS = [1, 2, 4];
  const DICE_MAX = 2 ** 32; // dice seeds stay short enough to read; the API takes up to 2^63 - 1

  const $ = (id) => document.getElementById(id);
  const models = new Map(); // name -> normalised model description
  let busy = false;

  // ---------------------------------------------------------------- HTTP

  class ApiError extends Error {
    constructor(status, type, message, field, retryAfter) {
      super(message);
      this.status = status;
      this.type = type;
      this.field = field;
      this.retryAfter = retryAfter;
    }
  }

  /** Big integers wrapped so that `toJson` writes their digits verbatim (JS numbers are exact only to 2^53). */
  class BigNumber {
    constructor(digits) {
      this.digits = digits;
    }
  }

  /** A value as JSON, its BigNumbers (at any depth) as their digits. */
  function jsonValue(v) {
    if (v instanceof BigNumber) return v.digits;
    if (Array.isArray(v)) return `[${v.map(jsonValue).join(",")}]`;
    if (v && typeof v === "object") return toJson(v);
    return JSON.stringify(v);
  }

  function toJson(obj) {
    const parts = [];
    for (const [k, v] of Object.entries(obj)) {
      if (v === undefined) continue;
      parts.push(`${JSON.stringify(k)}:${jsonValue(v)}`);
    }
    return `{${parts.join(",")}}`;
  }

  /** Seeds reach 2^63 - 1: read them as strings before JSON.parse rounds them (base64 never holds a quote). */
  function quoteSeeds(text) {
    return text.replace(/"seed"\s*:\s*(-?\d+)/g, '"seed":"$1"');
  }

  function authHeaders() {
    const key = $("api-key").value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json", ...authHeaders() };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let resp;
    try {
      resp = await fetch(path, { method, headers, body, cache: "no-store" });
    } catch (e) {
      throw new ApiError(0, "network_error", `could not reach the server (${e.message})`, null, null);
    }
    const text = await resp.text();
    let doc = null;
    try {
      doc = JSON.parse(quoteSeeds(text));
    } catch {
      doc = null;
    }
    if (!resp.ok) throw errorFrom(resp, doc, text);
    if (doc === null) throw new ApiError(resp.status, "bad_response", "the server's answer is not JSON", null, null);
    return doc;
  }

  function errorFrom(resp, doc, text) {
    const retryAfter = resp.headers.get("Retry-After");
    const err = doc && typeof doc === "object" ? doc.error : null;
    if (err && typeof err === "object") {
      const message = typeof err.message === "string" ? err.message : JSON.stringify(err.message);
      return new ApiError(resp.status, err.type ?? "error", message, err.field ?? null, retryAfter);
    }
    const detail = doc && doc.detail !== undefined ? JSON.stringify(doc.detail) : text.slice(0, 500);
    return new ApiError(resp.status, "http_error", detail || resp.statusText, null, retryAfter);
  }

  // ---------------------------------------------------------------- models

  /** Accepts {"models": [...]}, {"data": [...]} or a bare list; each entry as GET /v1/models describes it. */
  function normaliseModels(doc) {
    const list = Array.isArray(doc) ? doc : doc.models ?? doc.data ?? [];
    const defaultName = Array.isArray(doc) ? null : doc.default ?? doc.default_model ?? null;
    return {
      defaultName,
      list: list.map((m) => {
        const sigma = m.sigma ?? {};
        let classes = m.class_names ?? m.classes ?? null;
        const numClasses = m.num_classes ?? (Array.isArray(classes) ? classes.length : 0);
        if (!Array.isArray(classes)) classes = numClasses ? [...Array(numClasses).keys()].map(String) : [];
        return {
          name: m.name ?? m.id ?? m.model,
          shape: m.image_shape ?? m.data_shape ?? m.shape ?? null,
          classes,
          sigmaMin: m.sigma_min ?? sigma.min ?? (m.sigma_range ? m.sigma_range[0] : null),
          sigmaMax: m.sigma_max ?? sigma.max ?? (m.sigma_range ? m.sigma_range[1] : null),
          schedules: m.recommended_schedules ?? m.schedules ?? {},
          maxSteps: m.max_steps ?? null,
          maxImages: m.max_images_per_request ?? null,
          isDefault: Boolean(m.default),
        };
      }),
    };
  }

  async function loadModels() {
    const select = $("model");
    let doc;
    try {
      doc = await api("GET", "/v1/models");
    } catch (e) {
      select.replaceChildren(new Option("(models unavailable)", ""));
      showError(e, "GET /v1/models");
      updateModelInfo();
      return;
    }
    const { defaultName, list } = normaliseModels(doc);
    const previous = select.value;
    models.clear();
    select.replaceChildren();
    for (const m of list) {
      models.set(m.name, m);
      select.add(new Option(m.name, m.name));
    }
    const preferred = [previous, defaultName, list.find((m) => m.isDefault)?.name].find((n) => n && models.has(n));
    if (preferred) select.value = preferred;
    hideError();
    updateModelInfo();
  }

  function currentModel() {
    return models.get($("model").value) ?? null;
  }

  function recommendedSigmas(model, steps) {
    const s = model ? model.schedules[String(steps)] ?? model.schedules[steps] : null;
    return Array.isArray(s) ? s : null;
  }

  function fmtSigma(x) {
    return Number(x).toPrecision(4).replace(/\.?0+$/, "").replace(/\.?0+e/, "e");
  }

  function updateModelInfo() {
    const m = currentModel();
    const info = [];
    if (m) {
      if (Array.isArray(m.shape)) info.push(m.shape.join("×"));
      info.push(m.classes.length ? `${m.classes.length} classes` : "unconditional");
      if (m.sigmaMin != null && m.sigmaMax != null) info.push(`σ ${fmtSigma(m.sigmaMin)} – ${fmtSigma(m.sigmaMax)}`);
    }
    $("model-info").textContent = info.join(" · ");
    // the limits only inform the spinners; the server is the judge (novalidate form)
    $("n").max = m && m.maxImages ? String(m.maxImages) : "";
    $("steps").max = m && m.maxSteps ? String(m.maxSteps) : "";
    $("sigmas-help").textContent =
      m && m.sigmaMax != null ? `strictly decreasing, first ≤ ${fmtSigma(m.sigmaMax)}, all > ${fmtSigma(m.sigmaMin)}` : "";

    const select = $("class-label");
    const keep = select.value;
    select.replaceChildren(new Option("random", ""));
    for (const [i, name] of (m ? m.classes : []).entries()) {
      select.add(new Option(name === String(i) ? name : `${i} · ${name}`, String(i)));
    }
    select.value = [...select.options].some((o) => o.value === keep) ? keep : "";
    select.disabled = !m || m.classes.length === 0;
    updateStepsHelp();
  }

  function updateStepsHelp() {
    const m = currentModel();
    const sig = recommendedSigmas(m, $("steps").value);
    const limit = m && m.maxSteps ? `1 to ${m.maxSteps}` : "";
    const schedule = sig ? `σ ${sig.map(fmtSigma).join(", ")}` : "";
    $("steps-help").textContent = [limit, schedule].filter(Boolean).join(" · ");
  }

  /** "7 · seven" (or "seven" when short), "7" when the classes have no names, "—" when unconditional. */
  function classText(model, label, short = false) {
    if (label === null || label === undefined) return "—";
    const names = model ? model.classes : [];
    if (typeof label === "number" && names[label] !== undefined && names[label] !== String(label)) {
      return short ? names[label] : `${label} · ${names[label]}`;
    }
    return String(label);
  }

  // ---------------------------------------------------------------- request

  function mode() {
    return $("mode-sigmas").checked ? "sigmas" : "steps";
  }

  /** A number field's value; what the server should judge is passed through so its message names it. */
  function numberField(input) {
    const raw = input.value.trim();
    if (raw === "") return input.validity.badInput ? "" : undefined;
    const x = Number(raw);
    return Number.isFinite(x) ? x : raw;
  }

  function seedField() {
    const raw = $("seed").value.trim();
    if (raw === "") return undefined;
    if (/^\d+$/.test(raw)) return new BigNumber(BigInt(raw).toString());
    return raw; // not a whole number: the server says what is allowed
  }

  function sigmasField() {
    return $("sigmas")
      .value.split(/[\s,;]+/)
      .filter((t) => t !== "")
      .map((t) => (Number.isFinite(Number(t)) ? Number(t) : t));
  }

  function requestBody(overrides = {}) {
    const cls = $("class-label").value;
    const body = {
      model: $("model").value || undefined,
      n: numberField($("n")),
      seed: seedField(),
      class_label: cls === "" || $("class-label").disabled ? undefined : Number(cls),
    };
    if (mode() === "sigmas") body.sigmas = sigmasField();
    else body.steps = numberField($("steps"));
    return { ...body, ...overrides };
  }

  async function generate(body, path = "/v1/generate") {
    const t0 = performance.now();
    const doc = await api("POST", path, toJson(body));
    doc.roundTripMs = performance.now() - t0;
    return doc;
  }

  // ---------------------------------------------------------------- rendering

  function showError(e, what) {
    const box = $("error");
    const head = document.createElement("div");
    head.className = "error-head";
    head.textContent = e.status ? `${e.status} · ${e.type}` : e.type;
    if (what) head.textContent += ` — ${what}`;
    const msg = document.createElement("div");
    msg.id = "error-message";
    msg.className = "error-message";
    msg.textContent = e.message;
    box.replaceChildren(head, msg);
    if (e.field) {
      const field = document.createElement("div");
      field.className = "error-field";
      field.textContent = `field: ${e.field}`;
      box.append(field);
    }
    if (e.retryAfter) {
      const retry = document.createElement("div");
      retry.className = "error-field";
      retry.textContent = `retry after ${e.retryAfter} s`;
      box.append(retry);
    }
    box.hidden = false;
  }

  function hideError() {
    $("error").hidden = true;
    $("error").replaceChildren();
  }

  function asError(e) {
    return e instanceof ApiError ? e : new ApiError(0, "client_error", String(e && e.message ? e.message : e));
  }

  function renderTimings(doc) {
    const t = doc.timings_ms ?? {};
    const rows = [
      ["queue", t.queue],
      ["compute", t.compute],
      ["encode", t.encode],
      ["total", t.total],
      ["round trip", doc.roundTripMs],
    ];
    const dl = $("timings");
    dl.replaceChildren();
    for (const [name, ms] of rows) {
      if (typeof ms !== "number") continue;
      const div = document.createElement("div");
      div.dataset.timing = name;
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      dd.textContent = `${ms.toFixed(1)} ms`;
      div.append(dt, dd);
      dl.append(div);
    }
    dl.hidden = false;
  }

  function sigmaSummary(sigmas) {
    return Array.isArray(sigmas) ? sigmas.map(fmtSigma).join(" → ") : "?";
  }

  function tile(doc, im, size) {
    const model = models.get(doc.model) ?? currentModel();
    const fig = document.createElement("figure");
    fig.className = `tile ${size}`;
    fig.dataset.seed = String(im.seed);
    fig.dataset.classLabel = String(im.class_label ?? "");
    const btn = document.createElement("button");
    btn.type = "button";
    btn.className = "thumb";
    const img = document.createElement("img");
    img.src = `data:${im.mime};base64,${im.b64}`;
    img.alt = `generated image, seed ${im.seed}, class ${classText(model, im.class_label)}`;
    btn.append(img);
    btn.setAttribute("aria-label", `enlarge image with seed ${im.seed}`);
    btn.addEventListener("click", () => openLightbox(doc, im));
    const cap = document.createElement("figcaption");
    const seed = document.createElement("span");
    seed.className = "seed";
    seed.textContent = String(im.seed);
    const cls = document.createElement("span");
    cls.className = "cls";
    cls.textContent = classText(model, im.class_label, true);
    cls.title = `class ${classText(model, im.class_label)}`;
    seed.title = `seed ${im.seed}`;
    cap.append(seed, cls);
    fig.append(btn, cap);
    return fig;
  }

  /** The side in pixels of a model's images (8 for digits, 64 or 256 for the public models). */
  function imageSide(model) {
    return model && Array.isArray(model.shape) ? Number(model.shape[model.shape.length - 1]) || 8 : 8;
  }

  /** Size a container's tiles for its images: small ones (digits, 64×64) enlarged with square pixels, large
   * ones (256×256) drawn smoothly in wider tiles, so that a request's images still fit the page. */
  function sizeTiles(container, model) {
    const side = imageSide(model);
    container.style.setProperty("--tile-min", `${side >= 128 ? 200 : side >= 32 ? 128 : 112}px`);
    container.dataset.smooth = String(side >= 128);
  }

  function renderGrid(doc) {
    sizeTiles($("grid"), models.get(doc.model) ?? currentModel());
    $("grid").replaceChildren(...doc.images.map((im) => tile(doc, im, "big")));
    $("empty").hidden = true;
    renderTimings(doc);
    $("run-info").textContent =
      `${doc.model} · seed ${doc.seed} · σ ${sigmaSummary(doc.sigmas)} · ${doc.images.length} image` +
      (doc.images.length === 1 ? "" : "s");
  }

  function renderCompare(docs) {
    const table = document.createElement("table");
    const head = table.createTHead().insertRow();
    const th0 = document.createElement("th");
    th0.scope = "col";
    th0.textContent = "seed";
    head.append(th0);
    for (const [i, doc] of docs.entries()) {
      const th = document.createElement("th");
      th.scope = "col";
      th.dataset.steps = String(COMPARE_STEPS[i]);
      const steps = COMPARE_STEPS[i];
      th.append(`${steps} step${steps === 1 ? "" : "s"}`);
      const sub = document.createElement("span");
      sub.className = "muted small";
      const total = doc.timings_ms && typeof doc.timings_ms.total === "number" ? ` · ${doc.timings_ms.total.toFixed(1)} ms` : "";
      sub.textContent = `σ ${sigmaSummary(doc.sigmas)}${total}`;
      th.append(document.createElement("br"), sub);
      head.append(th);
    }
    const tbody = table.createTBody();
    for (const [row, im] of docs[0].images.entries()) {
      const tr = tbody.insertRow();
      const th = document.createElement("th");
      th.scope = "row";
      th.textContent = String(im.seed);
      tr.append(th);
      for (const doc of docs) {
        const td = tr.insertCell();
        td.append(tile(doc, doc.images[row], "small"));
      }
    }
    sizeTiles($("compare-grid"), models.get(docs[0].model) ?? currentModel());
    $("compare-grid").replaceChildren(table);
    $("compare-view").hidden = false;
  }

  // ---------------------------------------------------------------- lightbox

  function openLightbox(doc, im) {
    const model = models.get(doc.model) ?? currentModel();
    const src = `data:${im.mime};base64,${im.b64}`;
    const ext = (im.mime.split("/")[1] || "png").replace("jpeg", "jpg");
    $("lightbox-img").src = src;
    $("lightbox-img").alt = `generated image, seed ${im.seed}`;
    $("lightbox-caption").textContent =
      `${doc.model} · seed ${im.seed} · class ${classText(model, im.class_label)} · σ ${sigmaSummary(doc.sigmas)}`;
    const link = $("lightbox-download");
    link.href = src;
    link.download = `${doc.model}-seed${im.seed}${im.class_label == null ? "" : `-class${im.class_label}`}.${ext}`;
    const dialog = $("lightbox");
    dialog.dataset.src = src;
    dialog.dataset.smooth = String(imageSide(model) >= 128);
    if (typeof dialog.showModal === "function") dialog.showModal();
    else dialog.setAttribute("open", "");
  }

  function closeLightbox() {
    const dialog = $("lightbox");
    if (typeof dialog.close === "function") dialog.close();
    else dialog.removeAttribute("open");
  }

  // ---------------------------------------------------------------- actions

  const ACTION_BUTTONS = ["generate", "compare", "edit-run", "interp-run"];

  async function run(label, action) {
    if (busy) return;
    busy = true;
    for (const id of ACTION_BUTTONS) $(id).disabled = true;
    $("status").textContent = label;
    document.querySelector(".results").setAttribute("aria-busy", "true");
    try {
      await action();
      hideError();
      $("status").textContent = "";
    } catch (e) {
      showError(asError(e), null);
      $("status").textContent = "";
    } finally {
      busy = false;
      for (const id of ACTION_BUTTONS) $(id).disabled = false;
      document.querySelector(".results").removeAttribute("aria-busy");
    }
  }

  function onGenerate(event) {
    event.preventDefault();
    showTab("images");
    run("Generating…", async () => renderGrid(await generate(requestBody())));
  }

  function onCompare() {
    showTab("images");
    run("Comparing 1, 2 and 4 steps…", async () => {
      // the first answer fixes the seed (the server picks one if the field is empty); the rest reuse it
      const base = requestBody({ steps: undefined, sigmas: undefined });
      const first = await generate({ ...base, steps: COMPARE_STEPS[0] });
      const seed = new BigNumber(String(first.seed));
      const rest = await Promise.all(COMPARE_STEPS.slice(1).map((steps) => generate({ ...base, seed, steps })));
      renderCompare([first, ...rest]);
    });
  }

  function rollDice() {
    const [x] = crypto.getRandomValues(new Uint32Array(1));
    $("seed").value = String(x % DICE_MAX);
  }

  function onModeChange() {
    const sigmas = mode() === "sigmas";
    $("steps-box").hidden = sigmas;
    $("sigmas-box").hidden = !sigmas;
    if (sigmas && $("sigmas").value.trim() === "") {
      const sig = recommendedSigmas(currentModel(), $("steps").value);
      if (sig) $("sigmas").value = sig.map(fmtSigma).join(", ");
    }
  }

  // ---------------------------------------------------------------- tabs

  function showTab(name) {
    for (const [tab, view] of [["tab-images", "images-view"], ["tab-edit", "edit-view"]]) {
      const on = view === `${name}-view`;
      $(tab).setAttribute("aria-selected", String(on));
      $(view).hidden = !on;
    }
  }

  // ---------------------------------------------------------------- edit (POST /v1/edit) and interpolation

  // The image being edited, at the model's size, and its mask (1: regenerate), one byte per pixel.
  const edit = { pixels: null, mask: null, w: 0, h: 0, painting: false };

  function modelSize() {
    const m = currentModel();
    const shape = m && Array.isArray(m.shape) ? m.shape : [1, 8, 8];
    return { h: Number(shape[shape.length - 2]), w: Number(shape[shape.length - 1]) };
  }

  /** An image element (upload or generated tile) drawn at the model's size becomes the image to edit. */
  function setSource(img) {
    const { h, w } = modelSize();
    const canvas = document.createElement("canvas");
    canvas.width = w;
    canvas.height = h;
    canvas.getContext("2d").drawImage(img, 0, 0, w, h);
    edit.pixels = canvas.getContext("2d").getImageData(0, 0, w, h);
    edit.w = w;
    edit.h = h;
    edit.mask = new Uint8Array(w * h);
    $("edit-source-info").textContent = `${img.naturalWidth}×${img.naturalHeight} image, drawn at ${w}×${h}`;
    drawEdit();
  }

  function loadSource(src) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(setSource(img));
      img.onerror = () => reject(new ApiError(0, "client_error", "the browser cannot read this image"));
      img.src = src;
    });
  }

  /** The image with the mask shown in red over it. */
  function drawEdit() {
    const canvas = $("edit-canvas");
    if (!edit.pixels) return;
    canvas.width = edit.w;
    canvas.height = edit.h;
    const shown = new ImageData(new Uint8ClampedArray(edit.pixels.data), edit.w, edit.h);
    for (let i = 0; i < edit.mask.length; i++) {
      if (!edit.mask[i]) continue;
      shown.data[4 * i] = (shown.data[4 * i] + 255) / 2;
      shown.data[4 * i + 1] /= 2;
      shown.data[4 * i + 2] /= 2;
    }
    canvas.getContext("2d").putImageData(shown, 0, 0);
  }

  function paint(event) {
    if (!edit.painting || !edit.pixels) return;
    const canvas = $("edit-canvas");
    const rect = canvas.getBoundingClientRect();
    const x = Math.floor(((event.clientX - rect.left) / rect.width) * edit.w);
    const y = Math.floor(((event.clientY - rect.top) / rect.height) * edit.h);
    const r = Math.max(0, Math.round(edit.w / 32)); // brush half-width in pixels
    for (let j = y - r; j <= y + r; j++) {
      for (let i = x - r; i <= x + r; i++) {
        if (i >= 0 && j >= 0 && i < edit.w && j < edit.h) edit.mask[j * edit.w + i] = 1;
      }
    }
    drawEdit();
  }

  function maskLowerHalf() {
    if (!edit.pixels) return;
    edit.mask.fill(0);
    edit.mask.fill(1, Math.floor(edit.h / 2) * edit.w);
    drawEdit();
  }

  function clearMask() {
    if (!edit.pixels) return;
    edit.mask.fill(0);
    drawEdit();
  }

  function pngBase64(imageData) {
    const canvas = document.createElement("canvas");
    canvas.width = imageData.width;
    canvas.height = imageData.height;
    canvas.getContext("2d").putImageData(imageData, 0, 0);
    return canvas.toDataURL("image/png").split(",")[1];
  }

  function maskImage() {
    const out = new ImageData(edit.w, edit.h);
    for (let i = 0; i < edit.mask.length; i++) {
      const v = edit.mask[i] ? 255 : 0;
      out.data.set([v, v, v, 255], 4 * i);
    }
    return out;
  }

  /** The image averaged down by `f` (super-resolution's low-resolution input). */
  function downsampled(f) {
    const w = Math.floor(edit.w / f);
    const h = Math.floor(edit.h / f);
    const out = new ImageData(Math.max(1, w), Math.max(1, h));
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        for (let c = 0; c < 3; c++) {
          let sum = 0;
          for (let j = 0; j < f; j++) for (let i = 0; i < f; i++) sum += edit.pixels.data[4 * ((y * f + j) * edit.w + x * f + i) + c];
          out.data[4 * (y * w + x) + c] = Math.round(sum / (f * f));
        }
        out.data[4 * (y * w + x) + 3] = 255;
      }
    }
    return out;
  }

  function editBody() {
    const task = $("edit-task").value;
    const body = requestBody({ task });
    if (task === "superres") {
      const factor = numberField($("edit-factor"));
      body.factor = factor;
      body.image = pngBase64(downsampled(Number.isInteger(factor) && factor >= 1 ? factor : 1));
    } else {
      body.image = pngBase64(edit.pixels);
    }
    if (task === "inpaint") body.mask = pngBase64(maskImage());
    if (task === "denoise") {
      const sigma = $("edit-sigma").value.trim();
      body.sigma = Number.isFinite(Number(sigma)) && sigma !== "" ? Number(sigma) : sigma;
      body.steps = undefined;
      body.sigmas = undefined;
    }
    return body;
  }

  function onEdit() {
    run("Editing…", async () => {
      if (!edit.pixels) throw new ApiError(0, "client_error", "choose an image to edit first");
      const doc = await generate(editBody(), "/v1/edit");
      sizeTiles($("edit-grid"), models.get(doc.model) ?? currentModel());
      $("edit-grid").replaceChildren(...doc.images.map((im) => tile(doc, im, "big")));
    });
  }

  function seedValue(id) {
    const raw = $(id).value.trim();
    return /^\d+$/.test(raw) ? new BigNumber(BigInt(raw).toString()) : raw;
  }

  function onInterpolate() {
    run("Interpolating…", async () => {
      const interpolate = { seeds: [seedValue("interp-a"), seedValue("interp-b")], points: numberField($("interp-points")) };
      const doc = await generate(requestBody({ n: undefined, seed: undefined, interpolate }));
      sizeTiles($("interp-grid"), models.get(doc.model) ?? currentModel());
      $("interp-grid").replaceChildren(
        ...doc.images.map((im) => {
          const fig = tile(doc, im, "small");
          fig.dataset.alpha = String(im.alpha);
          fig.querySelector(".cls").textContent = `α ${Number(im.alpha).toFixed(2)}`;
          return fig;
        }),
      );
    });
  }

  function onUpload() {
    const file = $("edit-upload").files[0];
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => loadSource(reader.result).catch((e) => showError(asError(e), "upload"));
    reader.readAsDataURL(file);
  }

  function editFromLightbox() {
    const src = $("lightbox").dataset.src;
    closeLightbox();
    showTab("edit");
    if (src) loadSource(src).catch((e) => showError(asError(e), "edit"));
  }

  // ---------------------------------------------------------------- live server stats

  function fmtStat(x, digits) {
    if (typeof x !== "number" || !Number.isFinite(x)) return "—";
    return x.toFixed(digits);
  }

  function total(x) {
    // a per-model breakdown ({"digits": 3}) is summed; a plain number is returned as is
    if (x && typeof x === "object") return Object.values(x).reduce((a, b) => a + Number(b), 0);
    return x;
  }

  function renderStats(s) {
    $("stat-rps").textContent = fmtStat(s.requests_per_s, 1);
    $("stat-ips").textContent = fmtStat(s.images_per_s, 1);
    $("stat-queue").textContent = fmtStat(total(s.queue_depth), 0);
    $("stat-batch").textContent = fmtStat(s.mean_images_per_forward, 2);
    $("stat-inprog").textContent = fmtStat(total(s.in_progress), 0);
    const badge = $("stat-ready");
    badge.textContent = s.ready ? "ready" : "not ready";
    badge.className = `badge ${s.ready ? "ok" : "warn"}`;
    $("stats-error").hidden = true;
  }

  async function pollStats() {
    if (!document.hidden) {
      try {
        renderStats(await api("GET", "/v1/stats"));
      } catch (e) {
        const err = asError(e);
        $("stat-ready").textContent = "unknown";
        $("stat-ready").className = "badge warn";
        $("stats-error").textContent = `stats: ${err.status ? `${err.status} · ` : ""}${err.message}`;
        $("stats-error").hidden = false;
      }
    }
    setTimeout(pollStats, STATS_INTERVAL_MS);
  }

  // ---------------------------------------------------------------- wiring

  function init() {
    let stored = "";
    try {
      stored = sessionStorage.getItem(KEY_STORAGE) ?? "";
    } catch {
      stored = ""; // storage disabled: the key then lives only in the field
    }
    $("api-key").value = stored;
    $("api-key").addEventListener("input", () => {
      const key = $("api-key").value.trim();
      try {
        if (key) sessionStorage.setItem(KEY_STORAGE, key);
        else sessionStorage.removeItem(KEY_STORAGE);
      } catch {
        /* storage disabled */
      }
    });
    $("api-key").addEventListener("change", () => loadModels());
    $("key-form").addEventListener("submit", (e) => {
      e.preventDefault(); // Enter in the key field: use the key now
      loadModels();
    });
    $("gen-form").addEventListener("submit", onGenerate);
    $("compare").addEventListener("click", onCompare);
    $("dice").addEventListener("click", rollDice);
    $("model").addEventListener("change", updateModelInfo);
    $("steps").addEventListener("input", updateStepsHelp);
    $("mode-steps").addEventListener("change", onModeChange);
    $("mode-sigmas").addEventListener("change", onModeChange);
    $("lightbox-close").addEventListener("click", closeLightbox);
    $("lightbox-edit").addEventListener("click", editFromLightbox);
    $("tab-images").addEventListener("click", () => showTab("images"));
    $("tab-edit").addEventListener("click", () => showTab("edit"));
    $("edit-upload").addEventListener("change", onUpload);
    $("edit-run").addEventListener("click", onEdit);
    $("interp-run").addEventListener("click", onInterpolate);
    $("edit-lower-half").addEventListener("click", maskLowerHalf);
    $("edit-clear-mask").addEventListener("click", clearMask);
    $("edit-canvas").addEventListener("pointerdown", (e) => {
      edit.painting = true;
      $("edit-canvas").setPointerCapture(e.pointerId);
      paint(e);
    });
    $("edit-canvas").addEventListener("pointermove", paint);
    $("edit-canvas").addEventListener("pointerup", () => {
      edit.painting = false;
    });
    $("lightbox").addEventListener("click", (e) => {
      if (e.target === $("lightbox")) closeLightbox(); // a click on the backdrop
    });
    loadModels();
    pollStats();
  }

  init();
})();
