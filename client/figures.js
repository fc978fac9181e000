// The live figures panel: the server's once-a-second stats, the speaking indicator, and the
// frame rate this browser actually shows (which network trouble can make lower than sent).

import { engineLabel } from "./messages.js";

const EMPTY = "—";

export class Figures {
  constructor(root) {
    this.root = root;
    this.fields = Object.fromEntries(
      [...root.querySelectorAll("[data-figure]")].map((el) => [el.dataset.figure, el]),
    );
    this.speaking = document.querySelector("[data-testid=speaking]");
    this.shown = null;
  }

  /** The engine, known from /api/health before any call. */
  setEngine(name) {
    this.#set("engine", engineLabel(name));
    this.root.dataset.engine = name; // the animator gets a note explaining it (see CSS)
  }

  /** One {"type": "stats"} message from the server. */
  update(stats) {
    this.#set("fps", stats.delivered_fps);
    this.#set("generated", stats.generated_fps);
    this.#set("lag", stats.lag_ms);
    this.#set("dropped", stats.dropped);
    this.#set("inference", stats.inference_ms);
    if (stats.engine) this.setEngine(stats.engine);
  }

  /** Show the speaking indicator, resting, once a call has video. */
  activate() {
    if (this.speaking.dataset.speaking === "off") this.setSpeaking(false);
  }

  setSpeaking(speaking) {
    this.speaking.dataset.speaking = String(speaking);
    this.speaking.querySelector(".label").textContent = speaking ? "Speaking" : "Listening";
  }

  /** Count the frames the video element presents, once per second, while it plays. */
  watch(video) {
    this.unwatch();
    this.shown = new FrameCounter(video, (fps) => this.#set("shown", fps));
  }

  /** Back to the resting look between calls (the engine stays known). */
  reset() {
    this.unwatch();
    for (const name of ["fps", "generated", "lag", "dropped", "inference", "shown"]) this.#set(name, null);
    this.setSpeaking(false);
    this.speaking.dataset.speaking = "off";
  }

  unwatch() {
    this.shown?.stop();
    this.shown = null;
  }

  #set(name, value) {
    const el = this.fields[name];
    if (el) el.textContent = value === null || value === undefined ? EMPTY : String(value);
  }
}

/** Presented frames per second, from requestVideoFrameCallback where the browser has it. */
class FrameCounter {
  constructor(video, report) {
    this.video = video;
    this.running = "requestVideoFrameCallback" in HTMLVideoElement.prototype;
    if (!this.running) return;
    this.frames = 0;
    this.since = performance.now();
    const onFrame = (now) => {
      if (!this.running) return;
      this.frames += 1;
      if (now - this.since >= 1000) {
        report(Math.round((this.frames * 1000) / (now - this.since)));
        this.frames = 0;
        this.since = now;
      }
      this.handle = video.requestVideoFrameCallback(onFrame);
    };
    this.handle = video.requestVideoFrameCallback(onFrame);
  }

  stop() {
    if (!this.running) return;
    this.running = false;
    this.video.cancelVideoFrameCallback(this.handle);
  }
}
