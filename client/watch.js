// The watch page: plays one session's lip-synced video (and its audio) over WHEP. The session
// id is the last part of the address, /watch/{id}; a server with an API key needs the token
// in the link, /watch/{id}#token=..., as the main page does.

import * as api from "./api.js";

const byTestId = (id) => document.querySelector(`[data-testid="${id}"]`);
const video = byTestId("watch-video");
const status = byTestId("watch-status");
const sound = byTestId("watch-sound");
const sessionId = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop() ?? "");

function show(state, text) {
  document.body.dataset.state = state;
  status.textContent = text;
}

async function play() {
  try {
    await video.play();
  } catch {
    // Browsers refuse sound before a click (OBS does not): play muted, offer the sound.
    video.muted = true;
    await video.play().catch(() => {});
    sound.hidden = false;
  }
}

async function watch() {
  const pc = new RTCPeerConnection({ iceServers: await api.iceServers().catch(() => []) });
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.addTransceiver("audio", { direction: "recvonly" });
  const stream = new MediaStream();
  pc.addEventListener("track", ({ track }) => {
    stream.addTrack(track);
    video.srcObject = stream;
  });
  pc.addEventListener("connectionstatechange", () => {
    if (pc.connectionState === "failed") show("failed", "The connection failed. Reload to try again.");
    if (pc.connectionState === "closed" || pc.connectionState === "disconnected") {
      show("ended", "The session has ended.");
    }
  });
  video.addEventListener("playing", () => show("playing", ""));
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((resolve) => {
    // The server takes no trickled candidates: send them all, or what came within 2.5 s.
    if (pc.iceGatheringState === "complete") return resolve();
    const timer = setTimeout(resolve, 2500);
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") {
        clearTimeout(timer);
        resolve();
      }
    });
  });
  const { sdp, location: viewer } = await api.watch(sessionId, pc.localDescription.sdp);
  await pc.setRemoteDescription({ type: "answer", sdp });
  addEventListener("pagehide", () => api.stopWatching(viewer, { keepalive: true }).catch(() => {}));
  await play();
}

sound.addEventListener("click", () => {
  video.muted = false;
  sound.hidden = true;
});

watch().catch((error) => {
  const gone = error.status === 404;
  show("failed", gone ? "No such session is live: it may have ended." : `Cannot watch: ${error.message}.`);
});
