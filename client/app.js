// The page's controller: picks the photo, starts and stops the call, and keeps the status line
// saying what is happening. State lives in `document.body.dataset.state`, which the CSS uses to
// show the right controls and the tests use to wait for a call to be live.

import * as api from "./api.js";
import { LipSyncCall, unsupportedReason } from "./call.js";
import { Figures } from "./figures.js";
import {
  CONNECTION,
  UNSUPPORTED,
  describeApiError,
  describeServerError,
  describeStartError,
  describeUploadError,
  engineLabel,
} from "./messages.js";

const DEFAULT_AVATAR = "default";

const byTestId = (id) => document.querySelector(`[data-testid="${id}"]`);
const ui = {
  start: byTestId("start"),
  stop: byTestId("stop"),
  retry: byTestId("retry"),
  hear: byTestId("hear"),
  file: byTestId("avatar-file"),
  useDefault: byTestId("use-default"),
  preview: byTestId("avatar-preview"),
  photoInfo: byTestId("photo-info"),
  video: byTestId("avatar-video"),
  audio: byTestId("avatar-audio"),
  status: byTestId("status"),
  engine: byTestId("engine-badge"),
  photoCard: document.querySelector(".photo-card"),
  screen: document.querySelector(".screen"),
};
const figures = new Figures(document.querySelector(".figures"));

// Which controls each state offers; the photo can change only while no call runs.
const STATES = {
  loading: {},
  unsupported: { photo: true },
  uploading: {},
  idle: { start: true, photo: true },
  starting: { stop: true },
  connecting: { stop: true },
  live: { stop: true },
  trouble: { stop: true, retry: true }, // disconnected: it may still come back by itself
  failed: { start: true, retry: true, photo: true },
};

let avatar = null; // the photo the next call animates: {id, width, height, face: {box}}
let call = null; // the running LipSyncCall, if any
let everConnected = false;
let videoPlaying = false;
let retryCountdown = null;

/** Enter `state`; call showRetry() first where Retry is offered, as it replaces Start. */
function setState(state) {
  const offers = STATES[state];
  document.body.dataset.state = state;
  if (!offers.retry) hideRetry();
  ui.start.hidden = !offers.start || !ui.retry.hidden;
  ui.start.disabled = !avatar;
  ui.stop.hidden = !offers.stop;
  ui.file.disabled = ui.useDefault.disabled = !offers.photo;
}

function say({ text, tone = "info" }) {
  ui.status.textContent = text;
  ui.status.dataset.tone = tone;
}

function currentState() {
  return document.body.dataset.state;
}

// -- the photo ---------------------------------------------------------------------------

async function showAvatar(next) {
  const url = await api.previewUrl(next.id);
  avatar = next;
  if (ui.preview.src.startsWith("blob:")) URL.revokeObjectURL(ui.preview.src);
  ui.preview.src = url;
  ui.preview.alt = "The photo, with a green box around the face that will be animated";
  await ui.preview.decode().catch(() => {}); // show it whole, not line by line
  ui.preview.hidden = false;
  // The screen takes the photo's shape: the video has the same size as the photo.
  ui.screen.style.setProperty("--photo-aspect", `${next.width} / ${next.height}`);
  const [x1, y1, x2, y2] = next.face.box;
  const source = next.id === DEFAULT_AVATAR ? "Built-in photo" : "Your photo";
  ui.photoInfo.textContent = `${source}: ${next.width} × ${next.height} px, face found (${x2 - x1} × ${y2 - y1} px).`;
}

async function useDefault() {
  try {
    await showAvatar(await api.getAvatar(DEFAULT_AVATAR));
    return true;
  } catch (error) {
    say(describeApiError(error));
    return false;
  }
}

async function upload(file) {
  if (!file || !STATES[currentState()].photo) return;
  const before = currentState();
  setState("uploading");
  say({ text: `Uploading ${file.name} and looking for a face…` });
  try {
    await showAvatar(await api.uploadAvatar(file));
    setState(before === "unsupported" ? before : "idle");
    if (before !== "unsupported") say(ready());
  } catch (error) {
    setState(before === "unsupported" ? before : "idle");
    say(describeUploadError(error));
  }
}

function ready() {
  return { tone: "ok", text: "Photo ready. Press Start and speak: the face will speak with you." };
}

// -- the call ----------------------------------------------------------------------------

async function startCall() {
  if (call) await endCall();
  everConnected = videoPlaying = false;
  const current = (call = new LipSyncCall(avatar.id));
  const isCurrent = () => call === current;
  setState("starting");

  current.addEventListener("phase", ({ detail }) => {
    if (!isCurrent()) return;
    if (detail.phase === "microphone") say({ text: "Asking for the microphone: allow it in the browser's prompt." });
    else say({ text: "Connecting to the server…" });
  });
  current.addEventListener("video", ({ detail }) => {
    if (!isCurrent()) return;
    ui.video.srcObject = detail.stream;
    figures.watch(ui.video);
    figures.activate();
  });
  current.addEventListener("audio", ({ detail }) => {
    if (!isCurrent()) return;
    ui.audio.srcObject = detail.stream;
    applyHearing();
  });
  current.addEventListener("connection", ({ detail }) => isCurrent() && onConnection(detail));
  current.addEventListener("stats", ({ detail }) => isCurrent() && figures.update(detail));
  current.addEventListener("speaking", ({ detail }) => isCurrent() && figures.setSpeaking(detail.speaking));
  current.addEventListener("ended", ({ detail }) => {
    if (!isCurrent()) return;
    if (detail.reason === "error") fail(describeServerError(detail), { retry: true });
    else fail(detail.reason === "server" ? CONNECTION.serverEnded : CONNECTION.microphoneEnded, { retry: true });
  });

  try {
    await current.start();
    if (isCurrent() && currentState() === "starting") {
      setState("connecting");
      say({ text: "Connecting the media…" });
    }
  } catch (error) {
    if (!isCurrent()) return;
    const retry = error.name === "ApiError" && (error.status === 503 || error.status === 0);
    fail(describeStartError(error), { retry, after: error.retryAfter });
  }
}

function onConnection({ state, relay }) {
  if (state === "connected") {
    everConnected = true;
    if (videoPlaying) goLive();
    else say({ text: "Connected; waiting for the first frame…" });
  } else if (state === "disconnected") {
    showRetry();
    setState("trouble");
    say(CONNECTION.disconnected);
  } else if (state === "failed") {
    fail(everConnected ? CONNECTION.lost : CONNECTION.failed[relay], { retry: true });
  }
}

function goLive() {
  if (!call) return;
  setState("live");
  say({ tone: "ok", text: "Live. Speak, and the face speaks with you." });
}

/** Tear the call down and say why; `retry` offers the Retry button, after `after` seconds. */
async function fail(message, { retry = false, after = null } = {}) {
  const ending = endCall(); // the message shows now, not after the server confirms the end
  if (retry) showRetry(after);
  else hideRetry();
  setState("failed");
  say(message);
  await ending;
}

async function stopCall() {
  const ending = endCall();
  setState("idle");
  say({ text: "Ending the call…" });
  await ending;
  if (currentState() === "idle") say({ text: "Call ended. Press Start to talk again." });
}

/** End the call here and on the server, and put the screen back to the photo. */
async function endCall() {
  const ending = call;
  call = null;
  videoPlaying = false;
  figures.reset();
  ui.video.srcObject = null;
  ui.audio.srcObject = null;
  await ending?.stop();
}

// -- retrying ----------------------------------------------------------------------------

function showRetry(after = null) {
  hideRetry();
  ui.retry.hidden = false;
  let left = after ?? 0;
  const tick = () => {
    ui.retry.disabled = left > 0;
    ui.retry.textContent = left > 0 ? `Retry in ${left} s` : "Retry";
    if (left-- <= 0) hideCountdown();
  };
  tick();
  if (after) retryCountdown = setInterval(tick, 1000);
}

function hideRetry() {
  hideCountdown();
  ui.retry.hidden = true;
}

function hideCountdown() {
  clearInterval(retryCountdown);
  retryCountdown = null;
}

// -- hearing the avatar ------------------------------------------------------------------

// Off by default: with speakers, the avatar's voice would reach the microphone again.
function applyHearing() {
  ui.audio.muted = !ui.hear.checked;
  if (ui.hear.checked && ui.audio.srcObject) ui.audio.play().catch(() => {});
  else ui.audio.pause();
}

// -- wiring ------------------------------------------------------------------------------

function wire() {
  ui.start.addEventListener("click", startCall);
  ui.retry.addEventListener("click", startCall);
  ui.stop.addEventListener("click", stopCall);
  ui.hear.addEventListener("change", applyHearing);
  ui.file.addEventListener("change", () => {
    upload(ui.file.files[0]);
    ui.file.value = ""; // choosing the same file again must upload it again
  });
  ui.useDefault.addEventListener("click", async () => {
    if (await useDefault()) say(ready());
  });
  ui.video.addEventListener("playing", () => {
    videoPlaying = true;
    if (call && everConnected) goLive();
  });
  // Drop a photo on the card, as well as choosing one.
  ui.photoCard.addEventListener("dragover", (event) => {
    event.preventDefault();
    ui.photoCard.classList.add("dragging");
  });
  ui.photoCard.addEventListener("dragleave", () => ui.photoCard.classList.remove("dragging"));
  ui.photoCard.addEventListener("drop", (event) => {
    event.preventDefault();
    ui.photoCard.classList.remove("dragging");
    upload(event.dataTransfer.files[0]);
  });
  // Free the server's slot when the tab closes or navigates away; awaiting is impossible there.
  window.addEventListener("pagehide", () => call?.abandon());
}

async function init() {
  wire();
  try {
    const health = await api.health();
    figures.setEngine(health.engine);
    ui.engine.textContent = engineLabel(health.engine);
    document.body.dataset.engine = health.engine;
  } catch (error) {
    ui.engine.textContent = "Server unreachable";
    setState("failed");
    say(describeApiError(error));
    return;
  }
  const unsupported = unsupportedReason();
  const photoReady = await useDefault();
  if (unsupported) {
    setState("unsupported");
    say({ tone: "error", text: UNSUPPORTED[unsupported] });
  } else if (photoReady) {
    setState("idle");
    say(ready());
  } else {
    setState("failed");
  }
}

init();
