// One call with the lipsync server: the microphone goes up, the lip-synced video (and the same
// audio, in sync) comes back, and the `events` data channel brings stats and speaking changes.
// The page listens to the events this EventTarget dispatches; it knows nothing of WebRTC.

import * as api from "./api.js";

// Gathering usually completes in well under a second on a LAN; behind a slow STUN or TURN
// server we send what we have rather than keep the user waiting (the server does not trickle).
const ICE_GATHERING_TIMEOUT_MS = 2500;
// How long Stop waits for the server to confirm the session's end before hanging up anyway.
const DELETE_WAIT_MS = 3000;
// A connection not up by then never will be (ICE and DTLS take a second or two, a few through
// TURN): with no candidate pair at all, a browser would keep "checking" for good.
const CONNECT_TIMEOUT_MS = 15000;

// Voice processing on: the avatar's audio may play through speakers and must not echo back.
// No sampleRate: the browser captures at its own rate and the server resamples.
const MICROPHONE = {
  audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
  video: false,
};

/** Why this browser cannot make a call, or null when it can. */
export function unsupportedReason() {
  if (typeof RTCPeerConnection !== "function") return "no-webrtc";
  if (!navigator.mediaDevices?.getUserMedia) return window.isSecureContext ? "no-microphone-api" : "insecure";
  return null;
}

/**
 * Events: "phase" {phase: "microphone" | "connecting"}, "connection" {state, relay?}
 * (RTCPeerConnection's connectionState; on "failed", what the relay did: "none" when the
 * server offers no TURN server, "unreachable" when none of its TURN servers answered,
 * "tried" when relayed candidates were gathered and still failed), "video" {stream}, "audio" {stream}, "stats" {…}, "speaking" {speaking},
 * "ended" {reason: "microphone" | "server" | "error", code?, message?}: "error" when the
 * server ended the session because part of it failed, with its `error` event's code and message.
 */
export class LipSyncCall extends EventTarget {
  #pc = null;
  #microphone = null;
  #sessionId = null;
  #stopped = false;
  #serverError = null; // the server's last `error` event
  #turn = false; // whether the server offered a TURN server

  constructor(avatarId) {
    super();
    this.avatarId = avatarId;
  }

  get sessionId() {
    return this.#sessionId;
  }

  /** Resolves once the server has answered; the media then connects on its own. */
  async start() {
    this.#emit("phase", { phase: "microphone" });
    this.#microphone = await navigator.mediaDevices.getUserMedia(MICROPHONE);
    if (this.#stopped) return this.#release(); // Stop was pressed while the prompt was open
    const [track] = this.#microphone.getAudioTracks();
    track.addEventListener("ended", () => this.#emit("ended", { reason: "microphone" }));

    this.#emit("phase", { phase: "connecting" });
    const iceServers = await api.iceServers();
    this.#turn = iceServers.some((server) => [server.urls].flat().some((url) => /^turns?:/.test(url)));
    if (this.#stopped) return this.#release();
    const pc = (this.#pc = new RTCPeerConnection({ iceServers }));
    pc.addTransceiver(track, { direction: "sendrecv", streams: [this.#microphone] });
    pc.addTransceiver("video", { direction: "recvonly" });
    this.#listen(pc, pc.createDataChannel("events"));

    await pc.setLocalDescription(await pc.createOffer());
    await iceGathered(pc, ICE_GATHERING_TIMEOUT_MS);
    if (this.#stopped) return;
    const answer = await api.createSession({
      sdp: pc.localDescription.sdp,
      type: "offer",
      avatar: this.avatarId,
    });
    this.#sessionId = answer.id;
    if (this.#stopped) return this.#endOnServer(); // Stop was pressed during the request
    await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
    setTimeout(() => this.#giveUp(pc), CONNECT_TIMEOUT_MS);
  }

  async #giveUp(pc) {
    if (this.#stopped || pc !== this.#pc || ["connected", "failed", "closed"].includes(pc.connectionState)) return;
    this.#emit("connection", { state: "failed", relay: await this.#relay(pc) });
  }

  /** End the call: the microphone at once, then the session on the server (which frees its
   * slot), then the connection. Idempotent. */
  async stop() {
    this.#stopMicrophone(); // the user pressed Stop: the microphone goes off now
    // The DELETE before closing the connection: a closed connection lets the server end the
    // session by itself, and the DELETE would then find nothing (a 404 in the console). A
    // server that does not answer soon must not keep the connection open, though.
    await Promise.race([this.#endOnServer(), delay(DELETE_WAIT_MS)]);
    this.#release();
  }

  /** For page unload: nothing can be awaited, so the DELETE is sent as a keepalive request. */
  abandon() {
    this.#endOnServer({ keepalive: true });
    this.#release();
  }

  #listen(pc, channel) {
    pc.addEventListener("track", ({ track }) => {
      // One stream per kind: the video element stays muted, the audio element is the switch.
      this.#emit(track.kind, { stream: new MediaStream([track]) });
    });
    pc.addEventListener("connectionstatechange", async () => {
      if (this.#stopped) return;
      const state = pc.connectionState;
      this.#emit("connection", state === "failed" ? { state, relay: await this.#relay(pc) } : { state });
    });
    channel.addEventListener("message", ({ data }) => {
      let message;
      try {
        message = JSON.parse(data);
      } catch {
        return; // not ours to show
      }
      if (message.type === "stats") this.#emit("stats", message);
      else if (message.type === "speaking") this.#emit("speaking", message);
      // Only an error that ends the session explains its end; others (a bad control
      // message, say) leave the session going.
      else if (message.type === "error" && message.fatal) this.#serverError = message;
    });
    // The server closes the channel when it ends the session (idle timeout, shutdown, or a
    // failure it announced with an `error` event just before).
    channel.addEventListener("close", () => {
      if (this.#stopped) return;
      const error = this.#serverError;
      this.#emit("ended", error ? { reason: "error", code: error.code, message: error.message } : { reason: "server" });
    });
  }

  /** What the relay did, for saying why the connection failed. */
  async #relay(pc) {
    if (!this.#turn) return "none";
    const stats = await pc.getStats().catch(() => new Map());
    const relayed = [...stats.values()].some((s) => s.type === "local-candidate" && s.candidateType === "relay");
    return relayed ? "tried" : "unreachable";
  }

  async #endOnServer({ keepalive = false } = {}) {
    this.#stopped = true;
    const id = this.#sessionId;
    this.#sessionId = null;
    if (id === null) return;
    try {
      await api.deleteSession(id, { keepalive });
    } catch {
      // Already gone (404) or unreachable: either way it is not running for us any more.
    }
  }

  #stopMicrophone() {
    this.#microphone?.getTracks().forEach((track) => track.stop());
    this.#microphone = null;
  }

  #release() {
    this.#stopped = true;
    this.#stopMicrophone();
    this.#pc?.close();
    this.#pc = null;
  }

  #emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

function delay(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Wait until the offer holds all our candidates (the server takes no trickled ones). */
function iceGathered(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", check);
      resolve();
    };
    const check = () => pc.iceGatheringState === "complete" && done();
    const timer = setTimeout(done, timeoutMs);
    pc.addEventListener("icegatheringstatechange", check);
  });
}
