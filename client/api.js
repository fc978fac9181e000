// The server's JSON API. Every failure there has one shape, {error: {code, message}}, so all
// calls throw one error type that carries what the server said, for the page to show.

export class ApiError extends Error {
  constructor(status, code, message, retryAfter = null) {
    super(message);
    this.name = "ApiError";
    this.status = status; // 0: the server could not be reached at all
    this.code = code;
    this.retryAfter = retryAfter; // seconds, from a Retry-After header
  }
}

// A server with an API key gives each visitor a token in the page's link, /#token=...: the
// fragment never reaches a server log. It is taken out of the address bar (so it is not shared
// with the link) and kept for this tab, so a reload still works.
const TOKEN_KEY = "lipsync-token";
const token = takeToken();

function takeToken() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  const fromLink = fragment.get("token");
  if (fromLink) {
    sessionStorage.setItem(TOKEN_KEY, fromLink);
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

// Paths are relative to the server's root, found from this module's own URL (/static/api.js),
// so every page works from any path, also behind a proxy that mounts the server under a prefix.
const ROOT = new URL("../", import.meta.url);

async function call(method, path, { body, headers = {}, keepalive = false } = {}) {
  if (token) headers = { ...headers, Authorization: `Bearer ${token}` };
  let response;
  try {
    response = await fetch(new URL(path, ROOT), { method, body, headers, keepalive });
  } catch (error) {
    throw new ApiError(0, "network", `cannot reach the server (${error.message})`);
  }
  if (response.ok) return response;
  let code = "http_" + response.status;
  let message = `the server answered ${response.status} ${response.statusText}`;
  try {
    const { error } = await response.json();
    if (error?.message) ({ code, message } = error);
  } catch {
    // Not our JSON (a proxy's error page, say): keep the generic message.
  }
  const retryAfter = Number.parseInt(response.headers.get("Retry-After") ?? "", 10);
  throw new ApiError(response.status, code, message, Number.isFinite(retryAfter) ? retryAfter : null);
}

/** Upload a photo as the raw body; the server decides its type from the bytes anyway. */
export async function uploadAvatar(file) {
  const headers = { "Content-Type": file.type || "application/octet-stream" };
  return (await call("POST", "api/avatars", { body: file, headers })).json();
}

export async function getAvatar(id) {
  return (await call("GET", `api/avatars/${encodeURIComponent(id)}`)).json();
}

/** The photo with its face box, as an object URL (an <img> could not send the token). */
export async function previewUrl(id) {
  const response = await call("GET", `api/avatars/${encodeURIComponent(id)}/preview`);
  return URL.createObjectURL(await response.blob());
}

export async function health() {
  return (await call("GET", "api/health")).json();
}

export async function iceServers() {
  const { iceServers } = await (await call("GET", "api/ice-servers")).json();
  return iceServers;
}

export async function createSession(offer) {
  return (await call("POST", "api/sessions", {
    body: JSON.stringify(offer),
    headers: { "Content-Type": "application/json" },
  })).json();
}

/** `keepalive` lets the request outlive the page (on unload; sendBeacon can only POST). */
export async function deleteSession(id, { keepalive = false } = {}) {
  await call("DELETE", `api/sessions/${encodeURIComponent(id)}`, { keepalive });
}

/** Watch a session over WHEP: the answer's SDP, and where to DELETE to stop watching. */
export async function watch(sessionId, offerSdp) {
  const response = await call("POST", `whep/${encodeURIComponent(sessionId)}`, {
    body: offerSdp,
    headers: { "Content-Type": "application/sdp" },
  });
  return { sdp: await response.text(), location: response.headers.get("Location") };
}

export async function stopWatching(location, { keepalive = false } = {}) {
  await call("DELETE", location.replace(/^\//, ""), { keepalive });
}
