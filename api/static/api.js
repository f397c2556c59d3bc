// The server's public API as any client calls it: the key as a Bearer header, SSE parsed by hand.

const KEY_STORAGE = "tokenmill.apiKey"; // sessionStorage only: gone when the tab closes

export class AuthError extends Error {}

export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function errorOf(response) {
  let message = `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch {
    // not JSON: the status says enough
  }
  return response.status === 401 ? new AuthError(message) : new Error(message);
}

export async function getJSON(path) {
  const response = await fetch(path, { headers: headers() });
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

// Whether the server wants a key on /v1/*: its OpenAPI document marks those operations
// (asking first means the page never makes a request it knows will be refused).
export async function keyRequired() {
  const doc = await getJSON("/openapi.json");
  const models = doc.paths && doc.paths["/v1/models"] && doc.paths["/v1/models"].get;
  return Boolean(models && models.security && models.security.length);
}

// POST a streamed chat completion; `onChunk` gets every decoded chunk, in order.
// Resolves when the stream ends with [DONE]; rejects with an AbortError once `signal` aborts.
export async function streamChat(body, signal, onChunk) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = event
        .split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart())
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") {
        await reader.cancel();
        return;
      }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || "stream error");
      onChunk(chunk);
    }
  }
}
