// ddserve playground: calls the HTTP contract's routes from the browser (no build step).
//
// Every model call is a job: POST it (202 + job), follow its events (GET /jobs/{id}/events, Server-
// Sent Events: progress and x̂₀ previews) until it is succeeded / failed / canceled — or, if the
// stream cannot be had, poll GET /jobs/{id} — then show the output images through their signed links.
// Inpainting masks follow the contract: white (255) = keep, black (0) = generate.
// VAE interpolation: POST /encode on images A and B, z_t = (1 − t)·z_A + t·z_B here, POST /decode.

const KEY_STORAGE = "ddserve.apiKey";
const POLL_MS = 150;
// Steps between x̂₀ previews of a generation: about 20 previews a job, never under the API's floor.
const PREVIEWS_PER_JOB = 20;
const MIN_PREVIEW_EVERY = 2;
function previewEvery(steps) {
  return Math.max(MIN_PREVIEW_EVERY, Math.ceil(steps / PREVIEWS_PER_JOB));
}
const TERMINAL = new Set(["succeeded", "failed", "canceled"]);

const $ = (id) => document.getElementById(id);

// --- HTTP -------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    const detail = (body && body.error) || {};
    const where = detail.param ? ` [${detail.param}]` : "";
    super(`${status} ${detail.code || "error"}${where}: ${detail.message || "request failed"}`);
    this.status = status;
    this.detail = detail;
  }
}

function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok && !(path === "readyz" && response.status === 503)) {
    throw new ApiError(response.status, data);
  }
  return data;
}

// One job from submission to a terminal state (succeeded, failed or canceled), which it returns;
// `onUpdate(job)` sees every state, `onPreviews(previews)` every set of x̂₀ previews ({index, png}).
// `control.jobId` is the job's id, for the cancel button.
async function runJob(route, body, onUpdate, control, onPreviews = () => {}) {
  let job = await api(route, { method: "POST", body });
  control.jobId = job.id;
  onUpdate(job);
  if (TERMINAL.has(job.status)) return job;
  try {
    return await followEvents(job, onUpdate, onPreviews);
  } catch (error) {
    if (error instanceof ApiError) throw error; // refused (404, 401): polling would be too
  }
  while (!TERMINAL.has(job.status)) {
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    job = await api(`jobs/${job.id}`);
    onUpdate(job);
  }
  return job;
}

// GET /jobs/{id}/events?preview=1 until its terminal event, whose data is the finished job. Read
// with fetch, not EventSource, which cannot send the Authorization header; line ends are CRLF
// (sse-starlette's), and a JSON data line holds no raw CR, so every CR is dropped. A broken stream is reopened with
// Last-Event-ID (nothing lost, nothing repeated), at most STREAM_RETRIES times in a row.
const STREAM_RETRIES = 3;
async function followEvents(job, onUpdate, onPreviews) {
  let lastId = null;
  let current = { ...job };
  for (let failures = 0; failures <= STREAM_RETRIES; failures++) {
    const headers = { Accept: "text/event-stream" };
    if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
    if (lastId) headers["Last-Event-ID"] = lastId;
    const response = await fetch(`jobs/${job.id}/events?preview=1`, { headers });
    if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replaceAll("\r", "");
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = parseEvent(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
          if (!event) continue;
          failures = 0;
          if (event.id) lastId = event.id;
          if (TERMINAL.has(event.event)) {
            onUpdate(event.data);
            return event.data;
          }
          current = jobAfter(current, event);
          onUpdate(current);
          if (event.data.previews) onPreviews(event.data.previews);
        }
      }
    } catch {
      // the connection broke: reopened below from the last event id
    }
  }
  throw new Error("the job's event stream broke");
}

// One SSE block → {event, id, data (JSON)}; null for a comment-only block (the heartbeat).
function parseEvent(block) {
  const event = { event: "message", id: null, data: [] };
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") event.data.push(value);
    else if (field === "event") event.event = value;
    else if (field === "id") event.id = value;
  }
  if (!event.data.length) return null;
  return { ...event, data: JSON.parse(event.data.join("\n")) };
}

// The job as the progress view shows it, after a queued / started / progress event.
function jobAfter(job, event) {
  if (event.event === "queued") return { ...job, status: "queued", queue_position: event.data.position };
  if (event.event === "started") return { ...job, status: "running" };
  if (event.event === "progress") {
    const { step, of } = event.data;
    return { ...job, status: "running", progress: { step, total: of, fraction: of ? step / of : 0 } };
  }
  return job;
}

// --- small views --------------------------------------------------------------------------------

class ProgressView {
  constructor(element) {
    this.element = element;
    this.bar = element.querySelector(".bar");
    this.label = element.querySelector(".label");
  }
  // `state`: "" while a job is on its way, else idle, done, failed or canceled (the CSS class).
  set(fraction, text, state = "") {
    this.element.classList.remove("idle", "done", "failed", "canceled");
    if (state) this.element.classList.add(state);
    this.bar.style.width = `${Math.round(Math.max(0, Math.min(1, fraction)) * 100)}%`;
    this.label.textContent = text;
    this.element.dataset.state = state || "running";
  }
  reset() {
    this.set(0, "idle", "idle");
  }
  show(job) {
    const p = job.progress;
    if (job.status === "queued") {
      const ahead = job.queue_position ? `, ${job.queue_position} ahead` : "";
      this.set(0, `queued${ahead}`);
    } else if (job.status === "running") {
      this.set(p ? p.fraction : 0, p ? `step ${p.step} / ${p.total}` : "running");
    } else if (job.status === "succeeded") {
      const seconds = job.metrics && job.metrics.run_time_s;
      const took = seconds != null ? ` in ${seconds.toFixed(2)} s` : "";
      const batch = job.metrics && job.metrics.batch_size ? `, batch ${job.metrics.batch_size}` : "";
      this.set(1, `succeeded${took}${batch}`, "done");
    } else if (job.status === "canceled") {
      // the user asked for it: a neutral state, not an error; the bar stays where the job stopped
      this.set(p ? p.fraction : 0, p ? `canceled at step ${p.step} / ${p.total}` : "canceled", "canceled");
    } else {
      this.set(1, job.status, "failed");
    }
  }
}

function showError(element, error) {
  if (!error) {
    element.hidden = true;
    element.textContent = "";
    return;
  }
  element.hidden = false;
  element.textContent = error.message || String(error);
}

function pictureOf(src, title = "") {
  const img = document.createElement("img");
  img.className = "pixelated";
  img.src = src;
  img.alt = title;
  img.title = title;
  return img;
}

function imageSource(image) {
  return image.url || `data:image/png;base64,${image.b64}`;
}

function fillSelect(select, options, chosen) {
  select.replaceChildren(
    ...options.map(([value, text]) => {
      const option = document.createElement("option");
      option.value = value;
      option.textContent = text;
      return option;
    }),
  );
  if (chosen !== undefined && options.some(([value]) => value === String(chosen))) {
    select.value = String(chosen);
  }
}

function numberOrNull(input) {
  return input.value === "" ? null : Number(input.value);
}

function withoutNulls(body) {
  return Object.fromEntries(Object.entries(body).filter(([, value]) => value !== null && value !== ""));
}

function describe(model) {
  const { channels, height, width } = model.image;
  const size = `${width}×${height}${channels === 3 ? " RGB" : ""}`;
  return `${model.kind} · ${model.dataset} · ${size}${model.description ? ` — ${model.description}` : ""}`;
}

// --- images in the browser ------------------------------------------------------------------------

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error(`cannot read image ${src.slice(0, 60)}`));
    img.src = src;
  });
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// Draw `img` onto `canvas` at the model's size (and in gray for a one-channel model): what the
// model will see.
function drawForModel(canvas, img, model) {
  const { width, height, channels } = model.image;
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.imageSmoothingEnabled = true;
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, width, height);
  ctx.drawImage(img, 0, 0, width, height);
  if (channels === 1) {
    const data = ctx.getImageData(0, 0, width, height);
    const px = data.data;
    for (let i = 0; i < px.length; i += 4) {
      const y = Math.round(0.299 * px[i] + 0.587 * px[i + 1] + 0.114 * px[i + 2]);
      px[i] = px[i + 1] = px[i + 2] = y;
    }
    ctx.putImageData(data, 0, 0);
  }
}

function canvasBase64(canvas) {
  return canvas.toDataURL("image/png").split(",", 2)[1];
}

// The shipped test images that suit a model, chosen by its image spec (not its name or dataset):
// those with its channels and size; else those with its channels, any size (drawn at the model's
// size); else all of them. Within the choice, the model's own dataset comes first.
function samplesFor(samples, image, dataset) {
  const sameChannels = samples.filter((s) => s.channels === image.channels);
  const sameSize = sameChannels.filter((s) => s.width === image.width && s.height === image.height);
  const chosen = sameSize.length ? sameSize : sameChannels.length ? sameChannels : samples;
  const rank = (s) => (s.dataset === dataset ? 0 : 1);
  return [...chosen].sort((a, b) => rank(a) - rank(b));
}

// Thumbnails of the test images for the selected model.
class SamplePicker {
  constructor(container, samples, onPick) {
    this.container = container;
    this.samples = samples;
    this.onPick = onPick;
  }
  render(model) {
    const chosen = samplesFor(this.samples, model.image, model.dataset);
    this.container.dataset.spec = `${model.image.width}x${model.image.height}x${model.image.channels}`;
    this.container.replaceChildren(
      ...chosen.map((sample) => {
        const img = pictureOf(`playground/samples/${sample.file}`, `${sample.dataset}: ${sample.label}`);
        img.dataset.file = sample.file;
        img.addEventListener("click", (event) => this.onPick(sample, img, event));
        return img;
      }),
    );
    return chosen;
  }
  mark(img, className) {
    for (const other of this.container.querySelectorAll(`img.${className}`)) other.classList.remove(className);
    if (img) img.classList.add(className);
  }
}

// --- the page --------------------------------------------------------------------------------------

class Playground {
  constructor() {
    this.models = [];
    this.samples = [];
  }

  async start() {
    const keyInput = $("api-key");
    keyInput.value = apiKey();
    keyInput.addEventListener("change", () => {
      localStorage.setItem(KEY_STORAGE, keyInput.value.trim());
      this.loadModels();
    });
    for (const tab of document.querySelectorAll(".tabs button")) {
      tab.addEventListener("click", () => this.showTab(tab.dataset.tab));
    }
    try {
      this.samples = (await (await fetch("playground/samples/index.json")).json()).samples;
    } catch {
      this.samples = [];
    }
    this.generate = new GeneratePanel(this);
    this.inpaint = new InpaintPanel(this);
    this.autoencoder = new AutoencoderPanel(this);
    await this.loadModels();
    this.checkReady();
    document.body.dataset.ready = "true";
  }

  showTab(name) {
    for (const tab of document.querySelectorAll(".tabs button")) {
      tab.classList.toggle("active", tab.dataset.tab === name);
    }
    for (const panel of document.querySelectorAll(".panel")) {
      panel.hidden = panel.id !== `tab-${name}`;
    }
  }

  async loadModels() {
    try {
      this.models = (await api("models")).models;
      showError($("global-error"), null);
    } catch (error) {
      this.models = [];
      const hint = error.status === 401 ? "\nThis gateway needs an API key: enter it at the top right." : "";
      showError($("global-error"), { message: `GET /models failed: ${error.message}${hint}` });
    }
    this.generate.setModels(this.models.filter((m) => m.tasks.includes("generate")));
    this.inpaint.setModels(this.models.filter((m) => m.tasks.includes("inpaint")));
    this.autoencoder.setModels(
      this.models.filter((m) => m.tasks.includes("reconstruct") || m.tasks.includes("encode")),
    );
    document.body.dataset.modelLoads = String(Number(document.body.dataset.modelLoads || 0) + 1);
  }

  async checkReady() {
    const status = $("status");
    try {
      const ready = await api("readyz");
      const workers = Object.entries(ready.workers || {})
        .map(([model, count]) => `${model}×${count}`)
        .join(", ");
      status.textContent = ready.ready ? `ready · workers ${workers || "—"}` : `not ready · missing ${ready.missing.join(", ") || "Redis"}`;
      status.className = `status ${ready.ready ? "ok" : "bad"}`;
    } catch (error) {
      status.textContent = `unreachable (${error.message})`;
      status.className = "status bad";
    }
    status.title = `GET /readyz: ${status.textContent}`; // the header shows one line, cut to fit
  }
}

// A panel with a model select, a progress bar, an error box and a job view.
class Panel {
  constructor(prefix) {
    this.prefix = prefix;
    this.select = $(`${prefix}-model`);
    this.progress = new ProgressView($(`${prefix}-progress`));
    this.errorBox = $(`${prefix}-error`);
    this.jobView = $(`${prefix}-job`);
    this.models = [];
    this.configuredFor = null; // the model description the form was last built for
    this.shownFor = null; // the model whose outputs are on show
    this.outputs = 0; // counts clearOutput() calls: a job's result is shown only if none came since
    this.control = { jobId: null };
    this.select.addEventListener("change", () => this.modelChanged());
    const cancel = $(`${prefix}-cancel`);
    if (cancel) {
      cancel.addEventListener("click", async () => {
        if (!this.control.jobId) return;
        const outputs = this.control.outputs;
        try {
          const job = await api(`jobs/${this.control.jobId}/cancel`, { method: "POST" });
          if (outputs === this.outputs) this.progress.show(job); // else: a previous model's job
        } catch (error) {
          if (outputs === this.outputs) showError(this.errorBox, error);
        }
      });
    }
  }

  get model() {
    return this.models.find((m) => m.name === this.select.value);
  }

  // The model to start on when the user has not chosen one (or it is no longer served).
  preferred(models) {
    return models[0];
  }

  setModels(models) {
    const previous = this.select.value;
    this.models = models;
    const kept = models.some((m) => m.name === previous);
    const start = kept ? previous : this.preferred(models)?.name;
    fillSelect(this.select, models.map((m) => [m.name, m.name]), start);
    const info = $(`${this.prefix}-model-info`);
    if (!models.length) {
      info.textContent = "no served model does this";
    }
    if (models.length) this.modelChanged();
  }

  modelChanged() {
    const model = this.model;
    $(`${this.prefix}-model-info`).textContent = model ? describe(model) : "";
    // Another model: the previous one's images, progress and errors no longer describe the form.
    if (model && this.shownFor !== null && model.name !== this.shownFor) this.clearOutput();
    this.shownFor = model ? model.name : null;
    // Reloading the model list (a new API key, say) must not reset what the user chose or
    // painted: the form is rebuilt only when the chosen model, or what it says of itself, changed.
    const shape = model ? JSON.stringify(model) : null;
    if (model && shape !== this.configuredFor) {
      this.configuredFor = shape;
      this.configure(model);
    }
  }

  configure() {}

  // Empty the output side (the panel's results, progress, error and job view).
  clearOutput() {
    this.outputs += 1;
    this.progress.reset();
    showError(this.errorBox, null);
    this.jobView.textContent = "";
    this.clearResults();
  }

  clearResults() {}

  // Run one job with this panel's progress bar, buttons and error box: the succeeded job, or null
  // when it failed (the error box says why), was canceled (the progress bar says so: the user's
  // choice, not an error) or the model was switched meanwhile (its result would be out of place).
  async run(route, body, busyButtons, onPreviews = () => {}) {
    showError(this.errorBox, null);
    const cancel = $(`${this.prefix}-cancel`);
    const outputs = this.outputs;
    const current = () => outputs === this.outputs;
    this.control.outputs = outputs;
    for (const button of busyButtons) button.disabled = true;
    if (cancel) cancel.disabled = false;
    this.progress.set(0, "submitting…");
    try {
      const job = await runJob(
        route,
        body,
        (update) => {
          if (!current()) return;
          this.progress.show(update);
          this.jobView.textContent = JSON.stringify(update, null, 2);
        },
        this.control,
        (previews) => {
          if (current()) onPreviews(previews);
        },
      );
      if (!current() || job.status === "canceled") return null;
      if (job.status !== "succeeded") {
        const reason = job.error ? `${job.error.code}: ${job.error.message}` : job.status;
        showError(this.errorBox, { message: `job ${job.status} (${reason})` });
        return null;
      }
      return job;
    } catch (error) {
      if (!current()) return null;
      showError(this.errorBox, error);
      if (this.progress.element.dataset.state !== "failed") this.progress.set(1, "failed", "failed");
      return null;
    } finally {
      for (const button of busyButtons) button.disabled = false;
      if (cancel) cancel.disabled = true;
      this.control.jobId = null;
    }
  }
}

function classOptions(model) {
  const cond = model.conditioning;
  if (!cond || cond.type !== "class") return [];
  return [["", "— none (unconditional) —"], ...cond.classes.map((name, i) => [String(i), `${i}: ${name}`])];
}

function setVisible(root, selector, visible) {
  for (const element of root.querySelectorAll(selector)) element.hidden = !visible;
}

// The guidance slider's range: diffusers' s, 1 = no guidance (the API's own limits).
const GUIDANCE_MIN = 1;
const GUIDANCE_MAX = 21;

class GeneratePanel extends Panel {
  constructor(page) {
    super("gen");
    this.page = page;
    this.form = $("gen-form");
    this.guidance = $("gen-guidance");
    // Until the user moves the slider it shows the model's default and the request leaves
    // guidance_scale out, so the server's default applies whatever it is.
    this.guidance.addEventListener("input", () => {
      this.guidance.dataset.touched = "true";
      this.showGuidance();
    });
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.submit();
    });
  }

  // The headline model: the first that generates with a diffusion schedule (an autoencoder's
  // decoded noise is a poor first impression), else the first that generates.
  preferred(models) {
    return models.find((m) => m.schedule && m.tasks.includes("generate")) || models[0];
  }

  clearResults() {
    $("gen-grid").replaceChildren();
    $("gen-caption").textContent = "";
    $("gen-trajectory-figure").hidden = true;
    $("gen-trajectory-img").removeAttribute("src");
  }

  showGuidance() {
    const value = Number(this.guidance.value);
    $("gen-guidance-value").textContent = value === 1 ? "1 · none" : String(value);
  }

  configure(model) {
    const d = model.defaults || {};
    const diffusion = Boolean(model.schedule);
    const cond = model.conditioning;
    setVisible(this.form, ".diffusion-only", diffusion);
    setVisible(this.form, ".class-only", Boolean(cond && cond.type === "class"));
    setVisible(this.form, ".text-only", Boolean(cond && cond.type === "text"));
    setVisible(this.form, ".conditional-only", diffusion && Boolean(cond));
    setVisible(this.form, ".classifier-only", Boolean(model.classifier));
    fillSelect($("gen-sampler"), model.samplers.map((s) => [s, s]), d.sampler);
    fillSelect($("gen-class"), classOptions(model));
    $("gen-steps").placeholder = d.num_inference_steps ?? "";
    $("gen-steps").max = model.schedule ? model.schedule.num_timesteps : 10000;
    $("gen-eta").placeholder = d.eta ?? "";
    const guidance = Math.min(GUIDANCE_MAX, Math.max(GUIDANCE_MIN, Number(d.guidance_scale ?? GUIDANCE_MIN)));
    this.guidance.min = String(GUIDANCE_MIN);
    this.guidance.max = String(GUIDANCE_MAX);
    this.guidance.value = String(guidance);
    delete this.guidance.dataset.touched;
    this.showGuidance();
    $("gen-guidance-default").textContent = d.guidance_scale != null ? `, s = ${d.guidance_scale}` : "";
    $("gen-classifier").placeholder = d.classifier_scale ?? "";
    const vocabulary = (cond && cond.vocabulary) || [];
    $("gen-vocabulary").replaceChildren(
      ...vocabulary.slice(1).map((word) => Object.assign(document.createElement("option"), { value: word })),
    );
  }

  body(model) {
    const diffusion = Boolean(model.schedule);
    const cond = model.conditioning;
    const classLabel = cond && cond.type === "class" ? numberOrNull($("gen-class")) : null;
    const prompt = cond && cond.type === "text" ? $("gen-prompt").value.trim() || null : null;
    const conditioned = classLabel !== null || prompt !== null;
    return withoutNulls({
      model: model.name,
      n: numberOrNull($("gen-n")) ?? 1,
      sampler: diffusion ? $("gen-sampler").value || null : null,
      num_inference_steps: diffusion ? numberOrNull($("gen-steps")) : null,
      eta: diffusion ? numberOrNull($("gen-eta")) : null,
      class_label: classLabel,
      prompt,
      // guidance needs a condition; an untouched slider leaves the model's default to the server
      guidance_scale: diffusion && conditioned && this.guidance.dataset.touched ? Number(this.guidance.value) : null,
      classifier_scale: diffusion && classLabel !== null && model.classifier ? numberOrNull($("gen-classifier")) : null,
      seed: numberOrNull($("gen-seed")),
      output: {
        return: "url",
        trajectory: diffusion && $("gen-trajectory").checked,
        preview_every: diffusion
          ? previewEvery(numberOrNull($("gen-steps")) ?? model.defaults?.num_inference_steps ?? 50)
          : null,
      },
    });
  }

  // x̂₀ previews while sampling: each image's latest, in the grid the final images will fill.
  showPreviews(previews, count) {
    const grid = $("gen-grid");
    grid.style.gridTemplateColumns = `repeat(${Math.min(4, count)}, 96px)`;
    while (grid.children.length < count) grid.append(pictureOf("", "preview"));
    for (const { index, png } of previews) {
      const img = grid.children[index];
      if (!img) continue;
      img.src = `data:image/png;base64,${png}`;
      img.classList.add("preview");
    }
  }

  async submit() {
    const model = this.model;
    if (!model) return;
    this.clearResults();
    const body = this.body(model);
    const job = await this.run("generate", body, [$("gen-submit")], (previews) =>
      this.showPreviews(previews, body.n ?? 1),
    );
    if (!job) return;
    const images = job.output.images;
    $("gen-grid").style.gridTemplateColumns = `repeat(${Math.min(4, images.length)}, 96px)`;
    $("gen-grid").replaceChildren(...images.map((im, i) => pictureOf(imageSource(im), `image ${i}, seed ${im.seed}`)));
    const used = job.input;
    const condition = used.class_label != null ? `class ${used.class_label}` : used.prompt ? `"${used.prompt}"` : "unconditional";
    $("gen-caption").textContent = `${images.length} × ${model.name}, ${used.sampler ?? ""} ${used.num_inference_steps ?? ""} steps, ${condition}, seed ${used.seed}`;
    if (job.output.trajectory_url) {
      $("gen-trajectory-img").src = job.output.trajectory_url;
      $("gen-trajectory-figure").hidden = false;
    }
  }
}

// The mask editor: `keep[y * W + x]` is 1 (keep, white) or 0 (generate, black); painting sets 0.
class MaskEditor {
  constructor(imageCanvas, maskCanvas) {
    this.imageCanvas = imageCanvas;
    this.maskCanvas = maskCanvas;
    this.width = 0;
    this.height = 0;
    this.keep = new Uint8Array(0);
    this.brush = 2;
    this.painting = null;
    maskCanvas.addEventListener("contextmenu", (event) => event.preventDefault());
    maskCanvas.addEventListener("pointerdown", (event) => {
      maskCanvas.setPointerCapture(event.pointerId);
      this.painting = event.button === 2 || event.shiftKey ? 1 : 0;
      this.paint(event);
    });
    maskCanvas.addEventListener("pointermove", (event) => {
      if (this.painting !== null) this.paint(event);
    });
    const stop = () => {
      this.painting = null;
    };
    maskCanvas.addEventListener("pointerup", stop);
    maskCanvas.addEventListener("pointercancel", stop);
  }

  reset(width, height) {
    this.width = width;
    this.height = height;
    this.keep = new Uint8Array(width * height).fill(1);
    this.maskCanvas.width = width;
    this.maskCanvas.height = height;
    this.render();
  }

  paint(event) {
    const box = this.maskCanvas.getBoundingClientRect();
    const cx = ((event.clientX - box.left) / box.width) * this.width;
    const cy = ((event.clientY - box.top) / box.height) * this.height;
    const r = this.brush / 2;
    for (let y = Math.floor(cy - r); y <= Math.ceil(cy + r); y++) {
      for (let x = Math.floor(cx - r); x <= Math.ceil(cx + r); x++) {
        if (x < 0 || y < 0 || x >= this.width || y >= this.height) continue;
        if ((x + 0.5 - cx) ** 2 + (y + 0.5 - cy) ** 2 <= r * r + 0.25) this.keep[y * this.width + x] = this.painting;
      }
    }
    this.render();
  }

  clear() {
    this.keep.fill(1);
    this.render();
  }

  invert() {
    for (let i = 0; i < this.keep.length; i++) this.keep[i] = 1 - this.keep[i];
    this.render();
  }

  get generatedPixels() {
    return this.keep.length - this.keep.reduce((sum, v) => sum + v, 0);
  }

  render() {
    const ctx = this.maskCanvas.getContext("2d");
    const data = ctx.createImageData(this.width, this.height);
    for (let i = 0; i < this.keep.length; i++) {
      if (!this.keep[i]) data.data.set([230, 40, 40, 140], i * 4);
    }
    ctx.putImageData(data, 0, 0);
    this.maskCanvas.dataset.generated = String(this.generatedPixels);
  }

  // The contract's mask: a PNG of the image's size, white (255) = keep, black (0) = generate.
  maskBase64() {
    const canvas = document.createElement("canvas");
    canvas.width = this.width;
    canvas.height = this.height;
    const ctx = canvas.getContext("2d");
    const data = ctx.createImageData(this.width, this.height);
    for (let i = 0; i < this.keep.length; i++) {
      const v = this.keep[i] ? 255 : 0;
      data.data.set([v, v, v, 255], i * 4);
    }
    ctx.putImageData(data, 0, 0);
    return canvasBase64(canvas);
  }
}

class InpaintPanel extends Panel {
  constructor(page) {
    super("inp");
    this.page = page;
    this.form = $("inp-form");
    this.editor = new MaskEditor($("inp-image"), $("inp-mask"));
    this.source = null; // the chosen picture (HTMLImageElement), redrawn at the model's size
    this.sourceFile = null; // its test image's file name; null for an upload
    this.picker = new SamplePicker($("inp-picker"), page.samples, (sample, img) => {
      this.picker.mark(img, "selected");
      this.useImage(`playground/samples/${sample.file}`, sample.file);
    });
    $("inp-brush").addEventListener("input", () => {
      this.editor.brush = Number($("inp-brush").value);
    });
    this.editor.brush = Number($("inp-brush").value);
    $("inp-clear").addEventListener("click", () => this.editor.clear());
    $("inp-invert").addEventListener("click", () => this.editor.invert());
    $("inp-upload").addEventListener("change", async () => {
      const file = $("inp-upload").files[0];
      if (file) {
        this.picker.mark(null, "selected");
        await this.useImage(await readFile(file));
      }
    });
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.submit();
    });
  }

  configure(model) {
    const d = model.defaults || {};
    fillSelect($("inp-sampler"), model.samplers.map((s) => [s, s]), d.sampler);
    fillSelect($("inp-class"), classOptions(model));
    setVisible(this.form, ".class-only", Boolean(model.conditioning && model.conditioning.type === "class"));
    $("inp-steps").placeholder = d.num_inference_steps ?? "";
    $("inp-jump").placeholder = d.jump_length ?? "";
    $("inp-resample").placeholder = d.jump_n_sample ?? "";
    $("inp-brush").max = String(Math.max(2, Math.round(model.image.width / 3)));
    const shown = this.picker.render(model);
    this.editor.reset(model.image.width, model.image.height);
    // An upload, or a test image this model is offered, stays; else its first test image.
    const offered = shown.some((s) => s.file === this.sourceFile);
    if (this.source && (this.sourceFile === null || offered)) {
      drawForModel(this.editor.imageCanvas, this.source, model);
      if (offered) this.picker.mark(this.picker.container.querySelector(`img[data-file="${this.sourceFile}"]`), "selected");
    } else if (shown.length) {
      const first = this.picker.container.querySelector("img");
      this.picker.mark(first, "selected");
      this.useImage(`playground/samples/${shown[0].file}`, shown[0].file);
    }
  }

  clearResults() {
    $("inp-grid").replaceChildren();
    $("inp-caption").textContent = "";
  }

  async useImage(src, file = null) {
    try {
      this.source = await loadImage(src);
      this.sourceFile = file;
      const model = this.model;
      if (model) {
        drawForModel(this.editor.imageCanvas, this.source, model);
        this.editor.reset(model.image.width, model.image.height);
      }
      showError(this.errorBox, null);
    } catch (error) {
      showError(this.errorBox, error);
    }
  }

  async submit() {
    const model = this.model;
    if (!model) return;
    if (!this.source) {
      showError(this.errorBox, { message: "pick or upload an image first" });
      return;
    }
    if (this.editor.generatedPixels === 0) {
      showError(this.errorBox, { message: "paint the region to generate on the image first" });
      return;
    }
    this.clearResults();
    const classLabel = this.form.querySelector(".class-only").hidden ? null : numberOrNull($("inp-class"));
    const body = withoutNulls({
      model: model.name,
      image: canvasBase64(this.editor.imageCanvas),
      mask: this.editor.maskBase64(),
      n: numberOrNull($("inp-n")) ?? 1,
      sampler: $("inp-sampler").value || null,
      num_inference_steps: numberOrNull($("inp-steps")),
      jump_length: numberOrNull($("inp-jump")),
      jump_n_sample: numberOrNull($("inp-resample")),
      class_label: classLabel,
      seed: numberOrNull($("inp-seed")),
    });
    const job = await this.run("inpaint", body, [$("inp-submit")]);
    if (!job) return;
    const images = job.output.images;
    $("inp-grid").style.gridTemplateColumns = `repeat(${Math.min(4, images.length)}, 96px)`;
    $("inp-grid").replaceChildren(...images.map((im, i) => pictureOf(imageSource(im), `variation ${i}`)));
    const used = job.input;
    $("inp-caption").textContent = `${images.length} inpainted, ${used.sampler} ${used.num_inference_steps} steps, jump ${used.jump_length} × r ${used.jump_n_sample}, seed ${used.seed}`;
  }
}

class AutoencoderPanel extends Panel {
  constructor(page) {
    super("ae");
    this.page = page;
    this.form = $("ae-form");
    this.sources = { a: null, b: null };
    this.files = { a: null, b: null }; // the test images' file names; null for uploads
    this.picker = new SamplePicker($("ae-picker"), page.samples, (sample, img, event) => {
      const slot = event.shiftKey ? "b" : "a";
      this.picker.mark(img, slot === "a" ? "selected" : "selected-b");
      this.useImage(slot, `playground/samples/${sample.file}`, sample.file);
    });
    for (const slot of ["a", "b"]) {
      $(`ae-upload-${slot}`).addEventListener("change", async () => {
        const file = $(`ae-upload-${slot}`).files[0];
        if (file) await this.useImage(slot, await readFile(file));
      });
    }
    $("ae-reconstruct").addEventListener("click", () => this.reconstruct());
    $("ae-interpolate").addEventListener("click", () => this.interpolate());
  }

  configure(model) {
    const reconstructs = model.tasks.includes("reconstruct");
    const interpolates = Boolean(model.latent_shape) && model.tasks.includes("encode") && model.tasks.includes("decode");
    setVisible(this.form, ".reconstruct-only", reconstructs);
    setVisible(this.form, ".interpolate-only", interpolates);
    this.form.querySelector(".interpolate-unavailable").hidden = interpolates || !model.code_shape;
    // the denoising autoencoder is the one to show a corrupted input for
    $("ae-noise").value = model.kind === "denoising-autoencoder" ? "gaussian" : "";
    const shown = this.picker.render(model);
    for (const [slot, index, mark] of [["a", 0, "selected"], ["b", 1, "selected-b"]]) {
      const file = this.files[slot];
      const offered = shown.some((s) => s.file === file);
      if (this.sources[slot] && (file === null || offered)) {
        drawForModel($(`ae-${slot}`), this.sources[slot], model);
        if (offered) this.picker.mark(this.picker.container.querySelector(`img[data-file="${file}"]`), mark);
      } else if (shown[index]) {
        this.picker.mark(this.picker.container.querySelectorAll("img")[index], mark);
        this.useImage(slot, `playground/samples/${shown[index].file}`, shown[index].file);
      }
    }
  }

  clearResults() {
    for (const id of ["ae-inputs", "ae-corrupted", "ae-outputs", "ae-strip"]) $(id).replaceChildren();
    $("ae-rows").hidden = true;
    $("ae-corrupted-row").hidden = true;
    $("ae-interpolation-figure").hidden = true;
  }

  async useImage(slot, src, file = null) {
    try {
      this.sources[slot] = await loadImage(src);
      this.files[slot] = file;
      if (this.model) drawForModel($(`ae-${slot}`), this.sources[slot], this.model);
    } catch (error) {
      showError(this.errorBox, error);
    }
  }

  images() {
    return ["a", "b"].filter((slot) => this.sources[slot]).map((slot) => canvasBase64($(`ae-${slot}`)));
  }

  async reconstruct() {
    const model = this.model;
    const images = this.images();
    if (!model || !images.length) return;
    const kind = $("ae-noise").value;
    const body = withoutNulls({
      model: model.name,
      images,
      noise: kind ? { kind, amount: numberOrNull($("ae-amount")) ?? 0.5 } : null,
      seed: numberOrNull($("ae-seed")),
    });
    const job = await this.run("reconstruct", body, [$("ae-reconstruct"), $("ae-interpolate")]);
    if (!job) return;
    const inputs = ["a", "b"].filter((slot) => this.sources[slot]).map((slot) => {
      const copy = pictureOf($(`ae-${slot}`).toDataURL(), `input ${slot.toUpperCase()}`);
      return copy;
    });
    $("ae-inputs").replaceChildren(...inputs);
    const corrupted = job.output.corrupted || [];
    $("ae-corrupted-row").hidden = !corrupted.length;
    $("ae-corrupted").replaceChildren(...corrupted.map((im) => pictureOf(imageSource(im), "corrupted input")));
    $("ae-outputs").replaceChildren(...job.output.images.map((im) => pictureOf(imageSource(im), "reconstruction")));
    $("ae-rows").hidden = false;
  }

  async interpolate() {
    const model = this.model;
    if (!model || !this.sources.a || !this.sources.b) {
      showError(this.errorBox, { message: "choose two images, A and B (shift-click picks B)" });
      return;
    }
    const steps = Math.max(2, Math.min(16, numberOrNull($("ae-steps")) ?? 8));
    const buttons = [$("ae-reconstruct"), $("ae-interpolate")];
    const encoded = await this.run("encode", { model: model.name, images: this.images() }, buttons);
    if (!encoded) return;
    const [za, zb] = encoded.output.latents;
    const latents = [];
    for (let k = 0; k < steps; k++) {
      const t = k / (steps - 1);
      latents.push(lerp(za, zb, t));
    }
    const decoded = await this.run("decode", { model: model.name, latents }, buttons);
    if (!decoded) return;
    $("ae-strip").replaceChildren(
      ...decoded.output.images.map((im, k) => pictureOf(imageSource(im), `t = ${(k / (steps - 1)).toFixed(2)}`)),
    );
    $("ae-interpolation-figure").hidden = false;
  }
}

// (1 − t)·a + t·b over nested arrays of numbers ([C, H, W] latents).
function lerp(a, b, t) {
  if (Array.isArray(a)) return a.map((value, i) => lerp(value, b[i], t));
  return (1 - t) * a + t * b;
}

new Playground().start();
