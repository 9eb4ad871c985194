// The service's web page: the HTTP API's first client (contract: docs/api.md). Plain modern
// JavaScript, no build step. Every server answer is shown in words; none is swallowed.
//
// The token lives in sessionStorage only. It travels in the Authorization header, and in the
// `?token=` query of the two streams, where browsers cannot set headers. It is never logged,
// never put in the page's own URL.

const STORAGE = {
  token: "imagegen.token",
  expires: "imagegen.expires",
  email: "imagegen.email",
};
const JOBS_PAGE = 10;
const RECONNECT_MAX_MS = 10000;

const $ = (id) => {
  const element = document.getElementById(id);
  if (!element) throw new Error(`missing #${id}`);
  return element;
};

const el = {
  alert: $("alert"),
  alertText: $("alert-text"),
  alertDismiss: $("alert-dismiss"),
  session: $("session"),
  sessionUser: $("session-user"),
  logout: $("logout"),
  loginView: $("login-view"),
  loginForm: $("login-form"),
  email: $("email"),
  password: $("password"),
  loginSubmit: $("login-submit"),
  appView: $("app-view"),
  generateForm: $("generate-form"),
  prompt: $("prompt"),
  promptError: $("prompt-error"),
  numImages: $("num-images"),
  numImagesError: $("num-images-error"),
  generate: $("generate"),
  job: $("job"),
  jobTitle: $("job-title"),
  jobPrompt: $("job-prompt"),
  jobStatus: $("job-status"),
  connection: $("connection"),
  cancel: $("cancel"),
  metricTtfi: $("metric-ttfi"),
  metricTotal: $("metric-total"),
  metricImages: $("metric-images"),
  metricAttempts: $("metric-attempts"),
  grid: $("grid"),
  jobs: $("jobs"),
  jobsEmpty: $("jobs-empty"),
  jobsMore: $("jobs-more"),
  jobsRefresh: $("jobs-refresh"),
};

const FIELD_ERRORS = {
  prompt: { input: el.prompt, error: el.promptError, label: "Prompt" },
  num_images: { input: el.numImages, error: el.numImagesError, label: "Number of images" },
};

const state = {
  token: null,
  expiresAt: 0,
  expiryTimer: 0,
  job: null, // the job on screen (see openJob)
  jobsCursor: null,
  blockedUntil: { generate: 0, login: 0 },
};

// --- errors ------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, detail, retryAfterS) {
    super(describe(status, detail, retryAfterS));
    this.name = "ApiError";
    this.status = status; // 0: the server could not be reached
    this.detail = detail;
    this.retryAfterS = retryAfterS;
  }
}

function describeProblem(problem) {
  const loc = Array.isArray(problem.loc) ? problem.loc.filter((part) => part !== "body") : [];
  const field = FIELD_ERRORS[loc[0]];
  const where = field ? field.label : loc.join(".");
  return where ? `${where}: ${problem.msg}` : String(problem.msg);
}

function describeDetail(detail) {
  if (Array.isArray(detail)) return detail.map(describeProblem).join("; ");
  if (detail === null || detail === undefined || detail === "") return "";
  return typeof detail === "string" ? detail : JSON.stringify(detail);
}

// "Token has expired" -> "Token has expired."
function sentence(text) {
  return /[.!?]$/.test(text) ? text : `${text}.`;
}

function describe(status, detail, retryAfterS) {
  const text = describeDetail(detail);
  const wait = retryAfterS ? ` Try again in ${retryAfterS} s.` : "";
  switch (status) {
    case 0:
      return "Cannot reach the server. Check that it is running and try again.";
    case 401:
      return sentence(text || "Not logged in");
    case 404:
      return `${sentence(text || "Not found")} It may have expired, or the server was restarted.`;
    case 422:
      return `Please fix: ${text}.`;
    case 429:
      return `${sentence(text || "Too many requests")}${wait}`;
    case 503:
      return `The service is busy or restarting (${text || "unavailable"}).${wait}`;
    default:
      return `The server answered ${status}${text ? `: ${text}` : ""}.`;
  }
}

function parseRetryAfter(value) {
  if (!value) return null;
  if (/^\d+$/.test(value.trim())) return Number(value.trim());
  const when = Date.parse(value);
  return Number.isNaN(when) ? null : Math.max(1, Math.ceil((when - Date.now()) / 1000));
}

function showAlert(message) {
  el.alertText.textContent = message;
  el.alert.hidden = false;
}

function clearAlert() {
  el.alert.hidden = true;
  el.alertText.textContent = "";
}

// --- the API -----------------------------------------------------------------------------------

async function api(method, path, { body, auth = true, headers = {} } = {}) {
  const init = { method, headers: { Accept: "application/json", ...headers }, cache: "no-store" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  if (auth) {
    if (!state.token) {
      sessionEnded("Please log in.");
      throw new ApiError(401, "Not logged in", null);
    }
    init.headers.Authorization = `Bearer ${state.token}`;
  }
  let response;
  let text;
  try {
    response = await fetch(path, init);
    text = await response.text();
  } catch {
    throw new ApiError(0, null, null);
  }
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const detail = data && typeof data === "object" && "detail" in data ? data.detail : text;
    const error = new ApiError(
      response.status,
      detail || response.statusText,
      parseRetryAfter(response.headers.get("Retry-After")),
    );
    if (response.status === 401 && auth) sessionEnded(`${error.message} Please log in again.`);
    throw error;
  }
  return data;
}

const jobPath = (jobId) => `/api/generate/${encodeURIComponent(jobId)}`;

// --- session -----------------------------------------------------------------------------------

function restoreSession() {
  const token = sessionStorage.getItem(STORAGE.token);
  const expiresAt = Number(sessionStorage.getItem(STORAGE.expires) || 0);
  if (token && expiresAt > Date.now()) {
    startSession(token, expiresAt, sessionStorage.getItem(STORAGE.email) || "");
    return;
  }
  const expired = Boolean(token);
  forgetToken();
  showLogin(expired ? "Your session expired. Please log in again." : null);
}

function startSession(token, expiresAt, email) {
  state.token = token;
  state.expiresAt = expiresAt;
  sessionStorage.setItem(STORAGE.token, token);
  sessionStorage.setItem(STORAGE.expires, String(expiresAt));
  sessionStorage.setItem(STORAGE.email, email);
  clearTimeout(state.expiryTimer);
  // setTimeout's delay is a signed 32-bit number of milliseconds.
  const delay = Math.min(expiresAt - Date.now(), 2 ** 31 - 1);
  state.expiryTimer = setTimeout(() => sessionEnded("Your session expired. Please log in again."), delay);
  el.sessionUser.textContent = email;
  el.session.hidden = false;
  el.loginView.hidden = true;
  el.appView.hidden = false;
  loadJobs();
}

function forgetToken() {
  state.token = null;
  state.expiresAt = 0;
  clearTimeout(state.expiryTimer);
  for (const key of Object.values(STORAGE)) sessionStorage.removeItem(key);
}

function showLogin(message) {
  // Nothing of the last user's stays on screen for the next one.
  el.job.hidden = true;
  delete el.job.dataset.jobId;
  el.grid.replaceChildren();
  el.jobs.replaceChildren();
  el.session.hidden = true;
  el.appView.hidden = true;
  el.loginView.hidden = false;
  if (message) showAlert(message);
  el.email.focus();
}

// Any 401 (or an expired token) ends the session: streams stop, the login form comes back.
function sessionEnded(message) {
  if (!state.token && !el.loginView.hidden) return;
  closeJob();
  forgetToken();
  showLogin(message);
}

async function login(event) {
  event.preventDefault();
  if (Date.now() < state.blockedUntil.login) return;
  clearAlert();
  const email = el.email.value.trim();
  el.loginSubmit.disabled = true;
  try {
    const data = await api("POST", "/api/auth/login", {
      body: { email, password: el.password.value },
      auth: false,
    });
    startSession(data.access_token, Date.now() + data.expires_in * 1000, email);
    el.prompt.focus();
  } catch (error) {
    showAlert(error instanceof ApiError ? error.message : String(error));
    if (error.retryAfterS) blockButton("login", el.loginSubmit, "Log in", error.retryAfterS);
  } finally {
    if (Date.now() >= state.blockedUntil.login) el.loginSubmit.disabled = false;
  }
}

function logout() {
  clearAlert();
  closeJob();
  forgetToken();
  showLogin(null);
}

// A 429 or 503 with Retry-After: the button waits that long, counting down.
function blockButton(name, button, label, seconds) {
  state.blockedUntil[name] = Date.now() + seconds * 1000;
  button.disabled = true;
  const tick = () => {
    const left = Math.ceil((state.blockedUntil[name] - Date.now()) / 1000);
    if (left <= 0) {
      button.disabled = false;
      button.textContent = label;
      return;
    }
    button.textContent = `${label} (wait ${left} s)`;
    setTimeout(tick, 250);
  };
  tick();
}

// --- creating a job ----------------------------------------------------------------------------

function clearFieldErrors() {
  for (const { input, error } of Object.values(FIELD_ERRORS)) {
    input.removeAttribute("aria-invalid");
    error.hidden = true;
    error.textContent = "";
  }
}

function showFieldErrors(detail) {
  if (!Array.isArray(detail)) return;
  let first = null;
  for (const problem of detail) {
    const loc = Array.isArray(problem.loc) ? problem.loc.filter((part) => part !== "body") : [];
    const field = FIELD_ERRORS[loc[0]];
    if (!field) continue;
    field.input.setAttribute("aria-invalid", "true");
    field.error.textContent = field.error.textContent
      ? `${field.error.textContent} ${problem.msg}`
      : problem.msg;
    field.error.hidden = false;
    first ??= field.input;
  }
  first?.focus();
}

// crypto.randomUUID() needs a secure context; the page may well be served over plain http.
function randomKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
}

function chosenTransport() {
  return el.generateForm.elements.transport.value === "ws" ? "ws" : "sse";
}

async function generate(event) {
  event.preventDefault();
  if (el.generate.disabled) return;
  clearAlert();
  clearFieldErrors();
  // The server validates (its bounds are settings); a non-number is sent as typed, so its
  // answer names the problem.
  const raw = el.numImages.value.trim();
  const numImages = /^-?\d+$/.test(raw) ? Number(raw) : raw === "" ? null : raw;
  const request = {
    body: { prompt: el.prompt.value, num_images: numImages },
    headers: { "Idempotency-Key": randomKey() },
  };
  el.generate.disabled = true;
  try {
    let created;
    try {
      created = await api("POST", "/api/generate", request);
    } catch (error) {
      // The request may have reached the server before the connection broke: one retry with
      // the same Idempotency-Key gets the same job back instead of a second one.
      if (error.status !== 0) throw error;
      await new Promise((resolve) => setTimeout(resolve, 1000));
      created = await api("POST", "/api/generate", request);
    }
    await openJob(created.job_id, { fresh: true });
    loadJobs();
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    if (error.status === 401) return; // back at the login form already
    showAlert(error.message);
    if (error.status === 422) showFieldErrors(error.detail);
    if (error.retryAfterS) blockButton("generate", el.generate, "Generate", error.retryAfterS);
  } finally {
    if (Date.now() >= state.blockedUntil.generate) el.generate.disabled = false;
  }
}

// --- the job on screen -------------------------------------------------------------------------

const TRANSPORT_NAMES = { sse: "Server-Sent Events", ws: "WebSocket" };
const FINISHED = new Set(["completed", "failed", "canceled"]);
const IMAGE_LABELS = {
  running: "Working",
  completed: "Completed",
  failed: "Failed",
  canceled: "Canceled",
};
const JOB_LABELS = { ...IMAGE_LABELS, pending: "Pending", running: "Running" };

function formatMs(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return "–";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  return `${(ms / 1000).toFixed(2)} s`;
}

function plural(count, word) {
  return `${count} ${word}${count === 1 ? "" : "s"}`;
}

function closeJob() {
  const job = state.job;
  if (!job) return;
  job.closed = true;
  stopConnection(job);
  state.job = null;
}

// Opens a job: its snapshot first (prompt, size, what is already known), then its event stream
// from the start, which replays every event that already happened and then goes live.
async function openJob(jobId, { fresh = false } = {}) {
  closeJob();
  const job = {
    id: jobId,
    prompt: "",
    numImages: 0,
    createdAt: null,
    status: "pending",
    images: [],
    tiles: [],
    lastId: 0,
    done: false,
    closed: false,
    ttfiMs: null,
    totalMs: null,
    transport: chosenTransport(),
    conn: null,
    reconnectAttempts: 0,
    reconnectTimer: 0,
  };
  state.job = job;
  markCurrentInList();
  el.job.hidden = false;
  el.job.dataset.jobId = jobId;
  el.jobTitle.textContent = "Job";
  el.jobPrompt.textContent = "";
  el.grid.replaceChildren();
  el.cancel.hidden = true;
  setStatusText("Loading the job…", "loading");
  setConnection(job, "");
  renderMetrics(job, null);
  if (!fresh) el.jobTitle.focus();
  let snapshot;
  try {
    snapshot = await api("GET", jobPath(jobId));
  } catch (error) {
    if (state.job !== job) return;
    if (error.status !== 401) {
      setStatusText(error.message, "error");
      showAlert(error.message);
    }
    return;
  }
  if (state.job !== job) return;
  job.prompt = snapshot.prompt;
  job.numImages = snapshot.num_images;
  job.createdAt = Date.parse(snapshot.created_at);
  job.status = snapshot.status;
  job.ttfiMs = snapshot.ttfi_ms;
  job.totalMs = snapshot.total_ms;
  job.images = snapshot.results.map((result) => ({
    index: result.index,
    status: result.status,
    url: result.url,
    error: result.error,
    attempts: result.attempts,
    startedAt: null,
    finishedAt: null,
  }));
  el.jobTitle.textContent = `Job of ${plural(job.numImages, "image")}`;
  el.jobPrompt.textContent = job.prompt;
  job.tiles = job.images.map((image) => createTile(job, image));
  el.grid.replaceChildren(...job.tiles.map((tile) => tile.root));
  job.images.forEach((image) => renderTile(job, image));
  renderJob(job);
  connect(job, 0);
}

function createTile(job, image) {
  const root = document.createElement("li");
  root.className = "tile";
  const frame = document.createElement("div");
  frame.className = "frame";
  const placeholder = document.createElement("div");
  placeholder.className = "placeholder";
  placeholder.setAttribute("aria-hidden", "true");
  frame.append(placeholder);
  const meta = document.createElement("div");
  meta.className = "tile-meta";
  const title = document.createElement("p");
  title.className = "tile-title";
  const number = document.createElement("span");
  number.textContent = `#${image.index + 1}`;
  const badge = document.createElement("span");
  badge.className = "badge";
  title.append(number, " ", badge);
  const detail = document.createElement("p");
  detail.className = "tile-detail";
  const error = document.createElement("p");
  error.className = "tile-error";
  error.hidden = true;
  meta.append(title, detail, error);
  root.append(frame, meta);
  return { root, frame, placeholder, badge, detail, error, img: null };
}

function renderTile(job, image) {
  const tile = job.tiles[image.index];
  if (!tile) return;
  tile.root.dataset.status = image.status;
  tile.badge.textContent = IMAGE_LABELS[image.status] ?? image.status;
  tile.badge.dataset.status = image.status;
  const parts = [];
  if (image.attempts) parts.push(plural(image.attempts, "attempt"));
  if (image.startedAt !== null && image.finishedAt !== null) {
    const verb = { completed: "took", failed: "failed after" }[image.status] ?? "stopped after";
    parts.push(`${verb} ${formatMs(image.finishedAt - image.startedAt)}`);
  }
  if (image.finishedAt !== null && job.createdAt !== null) {
    parts.push(`done at +${formatMs(image.finishedAt - job.createdAt)}`);
  }
  tile.detail.textContent = parts.join(" · ") || (image.status === "running" ? "Waiting…" : "");
  // A canceled image's error just says "canceled": the badge says it already.
  const error = image.error && image.error.toLowerCase() !== image.status ? image.error : "";
  tile.error.textContent = error;
  tile.error.hidden = !error;
  if (image.url && (!tile.img || tile.img.dataset.src !== image.url)) {
    const img = document.createElement("img");
    img.alt = `${job.prompt} (image ${image.index + 1} of ${job.numImages})`;
    img.decoding = "async";
    img.width = 512;
    img.height = 512;
    img.dataset.src = image.url;
    img.addEventListener("load", () => tile.root.classList.add("loaded"));
    img.addEventListener("error", () => {
      tile.error.textContent = "The image did not load.";
      tile.error.hidden = false;
    });
    img.src = image.url;
    tile.img?.remove();
    tile.img = img;
    tile.frame.append(img);
  }
}

function setStatusText(text, status) {
  el.jobStatus.textContent = text;
  el.jobStatus.dataset.status = status;
}

function renderJob(job) {
  const count = (status) => job.images.filter((image) => image.status === status).length;
  const completed = count("completed");
  const failed = count("failed");
  const canceled = count("canceled");
  const total = job.numImages;
  const failedText = failed ? `, ${failed} failed` : "";
  const took = job.done && job.totalMs !== null ? ` after ${formatMs(job.totalMs)}` : "";
  let text;
  if (job.status === "completed") {
    text = `Completed${took}: ${completed} of ${total} images made${failedText}.`;
  } else if (job.status === "failed") {
    text = `Failed${took}: none of the ${total} images could be made.`;
  } else if (job.status === "canceled") {
    text = `Canceled${took}: ${completed} of ${total} images made${failedText}, ${canceled} canceled.`;
  } else {
    text = `Running: ${completed} of ${total} images ready${failedText}.`;
  }
  setStatusText(text, job.status);
  el.job.dataset.status = job.status;
  el.cancel.hidden = FINISHED.has(job.status);
  renderMetrics(job, null);
}

function renderMetrics(job, metrics) {
  el.metricTtfi.textContent = job.done && job.ttfiMs === null ? "none" : formatMs(job.ttfiMs);
  el.metricTotal.textContent = formatMs(job.totalMs);
  if (!job.images.length) {
    el.metricImages.textContent = "–";
    el.metricAttempts.textContent = "–";
    return;
  }
  const counts = {};
  for (const image of job.images) counts[image.status] = (counts[image.status] ?? 0) + 1;
  el.metricImages.textContent = ["completed", "failed", "canceled", "running"]
    .filter((status) => counts[status])
    .map((status) => `${counts[status]} ${status}`)
    .join(", ");
  if (metrics) {
    const retries = `${metrics.retries} ${metrics.retries === 1 ? "retry" : "retries"}`;
    el.metricAttempts.textContent = `${metrics.attempts} (${retries})`;
  } else {
    el.metricAttempts.textContent = String(job.images.reduce((sum, image) => sum + image.attempts, 0));
  }
}

function onEvent(job, type, id, payload) {
  if (state.job !== job || job.closed) return;
  if (Number.isFinite(id)) {
    if (id <= job.lastId) return; // already applied (a resume never repeats one, but be safe)
    job.lastId = id;
  }
  job.reconnectAttempts = 0;
  if (type === "progress") {
    const image = job.images[payload.index];
    if (!image) return;
    Object.assign(image, {
      status: payload.status,
      url: payload.url,
      error: payload.error,
      attempts: payload.attempts,
      startedAt: payload.started_at ? Date.parse(payload.started_at) : null,
      finishedAt: payload.finished_at ? Date.parse(payload.finished_at) : null,
    });
    if (job.status === "pending") job.status = "running";
    renderTile(job, image);
    renderJob(job);
  } else if (type === "done") {
    job.done = true;
    job.status = payload.status;
    job.ttfiMs = payload.ttfi_ms;
    job.totalMs = payload.total_ms;
    stopConnection(job, { finished: true });
    setConnection(job, "finished");
    renderJob(job);
    loadMetrics(job);
    loadJobs();
  }
}

async function loadMetrics(job) {
  try {
    const metrics = await api("GET", `${jobPath(job.id)}/metrics`);
    if (state.job !== job) return;
    job.ttfiMs = metrics.ttfi_ms;
    job.totalMs = metrics.total_ms;
    renderMetrics(job, metrics);
  } catch (error) {
    if (state.job === job && error.status !== 401) {
      showAlert(`The job's metrics could not be loaded. ${error.message}`);
    }
  }
}

async function cancelJob() {
  const job = state.job;
  if (!job || job.done) return;
  el.cancel.disabled = true;
  el.cancel.textContent = "Canceling…";
  try {
    const snapshot = await api("DELETE", jobPath(job.id));
    if (state.job !== job) return;
    // The stream brings the same news; the answer is shown at once in case it is reconnecting.
    for (const result of snapshot.results) {
      const image = job.images[result.index];
      if (image && image.status === "running" && result.status !== "running") {
        Object.assign(image, { status: result.status, error: result.error, attempts: result.attempts });
        renderTile(job, image);
      }
    }
    if (!job.done) job.status = snapshot.status;
    renderJob(job);
  } catch (error) {
    if (error.status !== 401) showAlert(`The job could not be canceled. ${error.message}`);
  } finally {
    el.cancel.disabled = false;
    el.cancel.textContent = "Cancel job";
  }
}

// --- live events: SSE or WebSocket -------------------------------------------------------------

function setConnection(job, phase, extra = "") {
  const name = TRANSPORT_NAMES[job.transport];
  const texts = {
    "": "",
    connecting: `Connecting over ${name}…`,
    live: `Live over ${name}.`,
    resuming: `Connecting over ${name}; resuming after event ${job.lastId}…`,
    resumed: `Reconnected over ${name}; resumed after event ${job.lastId}.`,
    reconnecting: `Connection lost. Reconnecting over ${name}${extra}; will resume after event ${job.lastId}…`,
    checking: "Connection lost. Checking the server…",
    gone: "This job is gone from the server.",
    finished: `All events received over ${name}.`,
  };
  el.connection.textContent = texts[phase] ?? phase;
  el.connection.dataset.phase = phase;
}

// ``finished``: the stream delivered ``done``, so the server is ending it itself.
function stopConnection(job, { finished = false } = {}) {
  clearTimeout(job.reconnectTimer);
  job.reconnectTimer = 0;
  const conn = job.conn;
  job.conn = null;
  if (finished) conn?.finish();
  else conn?.close();
}

function connect(job, cursor) {
  stopConnection(job);
  if (job.done || job.closed || !state.token) return;
  setConnection(job, cursor > 0 ? "resuming" : "connecting");
  if (job.transport === "ws") connectWebSocket(job, cursor);
  else connectEventSource(job, cursor);
}

function streamQuery(cursor) {
  const query = new URLSearchParams({ token: state.token });
  if (cursor > 0) query.set("last_event_id", String(cursor));
  return query.toString();
}

function connectEventSource(job, cursor) {
  const source = new EventSource(`${jobPath(job.id)}/stream?${streamQuery(cursor)}`);
  // After ``done`` the server ends the response; closing stops the browser's reconnect.
  const conn = { close: () => source.close(), finish: () => source.close() };
  job.conn = conn;
  let reconnecting = false;
  const current = () => job.conn === conn && state.job === job && !job.closed;
  source.addEventListener("open", () => {
    if (!current()) return;
    setConnection(job, reconnecting || cursor > 0 ? "resumed" : "live");
    reconnecting = false;
  });
  const handle = (type) => (event) => {
    if (!current()) return;
    let payload;
    try {
      payload = JSON.parse(event.data);
    } catch {
      showAlert(`The server sent an event that is not JSON: ${String(event.data).slice(0, 80)}`);
      return;
    }
    onEvent(job, type, Number(event.lastEventId), payload);
  };
  source.addEventListener("progress", handle("progress"));
  source.addEventListener("done", handle("done"));
  source.addEventListener("error", () => {
    if (!current()) return;
    if (source.readyState === EventSource.CONNECTING) {
      // The browser reconnects by itself and sends Last-Event-ID.
      reconnecting = true;
      setConnection(job, "reconnecting");
    } else {
      // The server refused the stream (a 401, 404 or 5xx): EventSource gives up and does not
      // say why, so the job's own route is asked.
      source.close();
      diagnose(job);
    }
  });
}

function connectWebSocket(job, cursor) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(`${scheme}//${location.host}${jobPath(job.id)}?${streamQuery(cursor)}`);
  const conn = {
    close: () => socket.close(1000),
    // After ``done`` the server closes with 1000: the page lets it, rather than closing from
    // its side at the same moment, and only closes itself if the server has not after a while.
    finish: () => {
      const timer = setTimeout(() => socket.close(1000), 3000);
      socket.addEventListener("close", () => clearTimeout(timer));
    },
  };
  job.conn = conn;
  const current = () => job.conn === conn && state.job === job && !job.closed;
  socket.addEventListener("open", () => {
    if (current()) setConnection(job, cursor > 0 ? "resumed" : "live");
  });
  socket.addEventListener("message", (message) => {
    if (!current()) return;
    let frame;
    try {
      frame = JSON.parse(message.data);
    } catch {
      showAlert(`The server sent a frame that is not JSON: ${String(message.data).slice(0, 80)}`);
      return;
    }
    onEvent(job, frame.type, Number(frame.id), frame.payload);
  });
  socket.addEventListener("close", (event) => {
    if (!current()) return;
    job.conn = null;
    if (job.done) return;
    if (event.code === 1008) {
      sessionEnded(`${event.reason || "The token was refused"}. Please log in again.`);
    } else if (event.code === 4404) {
      jobGone(job, event.reason || "Job not found");
    } else if (event.code === 1012) {
      scheduleReconnect(job, " (the server is restarting)");
    } else {
      scheduleReconnect(job, "");
    }
  });
}

function scheduleReconnect(job, why) {
  const delay = Math.min(RECONNECT_MAX_MS, 1000 * 2 ** job.reconnectAttempts);
  job.reconnectAttempts += 1;
  setConnection(job, "reconnecting", `${why} in ${Math.round(delay / 1000)} s`);
  clearTimeout(job.reconnectTimer);
  job.reconnectTimer = setTimeout(() => {
    if (state.job === job && !job.closed && !job.done) connect(job, job.lastId);
  }, delay);
}

function jobGone(job, detail) {
  setConnection(job, "gone");
  const text = `${detail}. It may have expired, or the server was restarted.`;
  setStatusText(text, "error");
  el.job.dataset.status = "gone";
  el.cancel.hidden = true;
  showAlert(text);
  loadJobs();
}

async function diagnose(job) {
  setConnection(job, "checking");
  try {
    await api("GET", jobPath(job.id));
    if (state.job !== job || job.closed || job.done) return;
    scheduleReconnect(job, " (the stream was refused)");
  } catch (error) {
    if (state.job !== job || job.closed || job.done) return;
    if (error.status === 401) return; // sessionEnded has run
    if (error.status === 404) {
      jobGone(job, describeDetail(error.detail) || "Job not found");
    } else if (error.status === 0) {
      scheduleReconnect(job, " (the server cannot be reached)");
    } else {
      scheduleReconnect(job, ` (${error.message})`);
    }
  }
}

function switchTransport() {
  const job = state.job;
  if (!job) return;
  job.transport = chosenTransport();
  if (!job.done && !job.closed && job.images.length) connect(job, job.lastId);
}

// --- earlier jobs ------------------------------------------------------------------------------

let jobsRequest = 0;

async function loadJobs({ more = false } = {}) {
  const request = ++jobsRequest;
  const query = new URLSearchParams({ limit: String(JOBS_PAGE) });
  if (more && state.jobsCursor) query.set("cursor", state.jobsCursor);
  el.jobsMore.disabled = true;
  try {
    const page = await api("GET", `/api/generate?${query}`);
    if (request !== jobsRequest) return;
    const items = page.results.map(jobItem);
    if (more) el.jobs.append(...items);
    else el.jobs.replaceChildren(...items);
    state.jobsCursor = page.next_cursor;
    el.jobsMore.hidden = !page.next_cursor;
    el.jobsEmpty.hidden = el.jobs.children.length > 0;
    markCurrentInList();
  } catch (error) {
    if (request === jobsRequest && error.status !== 401) {
      showAlert(`The list of jobs could not be loaded. ${error.message}`);
    }
  } finally {
    el.jobsMore.disabled = false;
  }
}

function jobItem(summary) {
  const item = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "job-item";
  button.dataset.jobId = summary.job_id;
  const prompt = document.createElement("span");
  prompt.className = "job-item-prompt";
  prompt.textContent = summary.prompt;
  const meta = document.createElement("span");
  meta.className = "job-item-meta";
  const badge = document.createElement("span");
  badge.className = "badge";
  badge.dataset.status = summary.status;
  badge.textContent = JOB_LABELS[summary.status] ?? summary.status;
  const created = new Date(summary.created_at);
  const when = document.createElement("time");
  when.dateTime = summary.created_at;
  when.textContent = created.toLocaleString();
  const facts = [plural(summary.num_images, "image")];
  if (summary.total_ms !== null) facts.push(formatMs(summary.total_ms));
  meta.append(badge, ` ${facts.join(" · ")} · `, when);
  button.append(prompt, meta);
  button.addEventListener("click", () => {
    clearAlert();
    openJob(summary.job_id);
  });
  item.append(button);
  return item;
}

function markCurrentInList() {
  const current = state.job?.id;
  for (const button of el.jobs.querySelectorAll(".job-item")) {
    if (button.dataset.jobId === current) button.setAttribute("aria-current", "true");
    else button.removeAttribute("aria-current");
  }
}

// --- wiring ------------------------------------------------------------------------------------

el.loginForm.addEventListener("submit", login);
el.logout.addEventListener("click", logout);
el.alertDismiss.addEventListener("click", clearAlert);
el.generateForm.addEventListener("submit", generate);
el.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    el.generateForm.requestSubmit();
  }
});
for (const radio of el.generateForm.elements.transport) radio.addEventListener("change", switchTransport);
el.cancel.addEventListener("click", cancelJob);
el.jobsRefresh.addEventListener("click", () => loadJobs());
el.jobsMore.addEventListener("click", () => loadJobs({ more: true }));

restoreSession();
