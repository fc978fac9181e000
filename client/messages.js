// What to tell the user, in one place: a sentence that says what happened and what to do,
// with a tone for the status line ("info", "ok", "warn" or "error").

const ENGINES = {
  animator: "built-in animator (no Wav2Lip weights)",
  wav2lip: "Wav2Lip",
};

/** A readable engine name; the animator says plainly that it is not real lip-sync. */
export function engineLabel(name) {
  return ENGINES[name] ?? name;
}

export const UNSUPPORTED = {
  "no-webrtc":
    "This browser cannot make WebRTC calls (no RTCPeerConnection). Use a recent Chrome, Edge, Firefox or Safari.",
  "no-microphone-api":
    "This browser cannot use a microphone (no getUserMedia). Use a recent Chrome, Edge, Firefox or Safari.",
  insecure:
    "The microphone only works on a secure page: open this over https:// or from http://localhost.",
};

/** An error from getUserMedia, the API or WebRTC, as the status line's {text, tone}. */
export function describeStartError(error) {
  switch (error?.name) {
    case "NotAllowedError":
    case "SecurityError":
      return {
        tone: "error",
        text: "Microphone access was denied. Allow the microphone for this site (the icon in the address bar) and press Start again.",
      };
    case "NotFoundError":
    case "OverconstrainedError":
      return {
        tone: "error",
        text: "No microphone was found. Connect or enable one, then press Start again.",
      };
    case "NotReadableError":
    case "AbortError":
      return {
        tone: "error",
        text: "The microphone could not be started: another application may be using it. Close it and press Start again.",
      };
    case "ApiError":
      return describeApiError(error);
    default:
      return { tone: "error", text: `Could not start: ${error?.message ?? error}.` };
  }
}

export function describeApiError(error) {
  if (error.status === 0) {
    return { tone: "error", text: "The server cannot be reached. Check that it is running, then retry." };
  }
  if (error.status === 401) {
    const expired = error.code === "token_expired";
    return {
      tone: "error",
      text: expired
        ? "Your access link has expired. Ask for a new link to this page."
        : "This server needs an access link (it has an API key). Open the page through the link you were given.",
    };
  }
  if (error.code === "degraded") {
    return { tone: "error", text: "The server's video engine failed; the server is restarting. Try again in a little while." };
  }
  if (error.status === 503) {
    // The server's message ends in its own vaguer "try again later"; Retry-After is exact.
    if (!error.retryAfter) return { tone: "warn", text: `The server is full: ${error.message}.` };
    const reason = error.message.split(";")[0];
    return { tone: "warn", text: `The server is full: ${reason}. Try again in ${error.retryAfter} seconds.` };
  }
  if (error.code === "avatar_not_found") {
    return {
      tone: "error",
      text: "The server no longer has this photo (it restarted, or many photos came after it). Choose the photo again.",
    };
  }
  return { tone: "error", text: `The server refused: ${sentence(error.message)}` };
}

/** An upload's failure; "no face" gets advice, anything else the server's own message. */
export function describeUploadError(error) {
  if (error.name !== "ApiError") return { tone: "error", text: `Upload failed: ${error.message}.` };
  if (error.code === "no_face") {
    return {
      tone: "error",
      text: "No face found in this photo. Choose a well-lit photo of one person looking at the camera, with the face clearly visible.",
    };
  }
  if (error.status === 0) return describeApiError(error);
  return { tone: "error", text: `This photo cannot be used: ${sentence(error.message)}` };
}

/** The server ended the call because part of it failed (its `error` event). */
export function describeServerError({ code, message }) {
  const text =
    code === "engine_failed"
      ? "The server's video engine failed, so the call ended; the server will restart. Press Retry in a moment."
      : `The server ended the call: ${sentence(message ?? "an internal error")} Press Retry to start again.`;
  return { tone: "error", text };
}

export const CONNECTION = {
  // Why ICE failed, by what the relay did (LipSyncCall's "connection" event).
  failed: {
    none: {
      tone: "error",
      text: "Could not connect the media: no network path between you and the server worked (a firewall may block UDP), and the server offers no TURN relay to go around it. Its operator can add one (--ice-server turn:…).",
    },
    unreachable: {
      tone: "error",
      text: "Could not connect the media: the server's TURN relay could not be reached from your network. A firewall may block it; TURN over TCP, or TLS on port 443, gets through most.",
    },
    tried: {
      tone: "error",
      text: "Could not connect the media, even through the server's TURN relay: the relay could not reach the server. Press Retry; if it fails again, tell the server's operator.",
    },
  },
  lost: {
    tone: "error",
    text: "The connection failed after it was up. Press Retry to start again.",
  },
  disconnected: {
    tone: "warn",
    text: "Connection lost. Waiting for it to come back; press Retry to start a new call.",
  },
  serverEnded: {
    tone: "warn",
    text: "The server ended the session (it got no audio for a while, or it is shutting down). Press Retry to start again.",
  },
  microphoneEnded: {
    tone: "error",
    text: "The microphone stopped (unplugged or switched off). Connect it and press Retry.",
  },
};

// The server's messages are lower-case clauses; shown alone they read better as a sentence.
function sentence(text) {
  const trimmed = String(text).trim();
  const capital = trimmed.charAt(0).toUpperCase() + trimmed.slice(1);
  return /[.!?]$/.test(capital) ? capital : capital + ".";
}
