// The chat playground: a streamed /v1/chat/completions per answer, as any client sends it.

import { AuthError, getJSON, streamChat } from "./api.js";
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);

function numberInput(id, fallback) {
  const value = Number.parseFloat($(id).value);
  return Number.isFinite(value) ? value : fallback;
}

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  const area = document.createElement("textarea"); // plain-HTTP pages have no clipboard API
  area.value = text;
  document.body.append(area);
  area.select();
  document.execCommand("copy");
  area.remove();
}

// One message on the page; an assistant answer's raw text is kept in data-raw (what Copy copies).
function messageView(role, label) {
  const node = document.createElement("article");
  node.className = `message ${role}`;
  node.dataset.role = role;
  const head = document.createElement("div");
  head.className = "role";
  head.textContent = label;
  const content = document.createElement("div");
  content.className = "content";
  const meta = document.createElement("footer");
  meta.className = "meta";
  node.append(head, content, meta);
  return node;
}

function setText(node, text, asMarkdown) {
  node.dataset.raw = text;
  const content = node.querySelector(".content");
  if (asMarkdown) content.replaceChildren(renderMarkdown(text));
  else content.textContent = text;
}

export class Chat {
  constructor(onAuthError) {
    this.onAuthError = onAuthError;
    this.turns = []; // {role, content, view}: what the next request sends
    this.controller = null;
    this.messages = $("messages");
    $("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      this.send();
    });
    $("prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey) {
        event.preventDefault();
        this.send();
      }
    });
    $("stop").addEventListener("click", () => this.stop());
    $("regenerate").addEventListener("click", () => this.regenerate());
    $("clear").addEventListener("click", () => this.clear());
  }

  async loadModels() {
    const select = $("model");
    const { data } = await getJSON("/v1/models");
    const chosen = select.value;
    select.replaceChildren(
      ...data.map((card) => {
        const option = document.createElement("option");
        option.value = card.id;
        option.textContent = card.parent ? `${card.id} (LoRA on ${card.parent})` : card.id;
        return option;
      }),
    );
    if (data.some((card) => card.id === chosen)) select.value = chosen;
    const base = data.find((card) => !card.parent);
    if (base && base.max_model_len) $("max-tokens").max = String(base.max_model_len);
    return data;
  }

  setBusy(busy) {
    $("send").disabled = busy;
    $("stop").disabled = !busy;
    $("regenerate").disabled = busy || !this.turns.some((t) => t.role === "assistant");
  }

  requestBody() {
    const messages = [];
    const system = $("system-prompt").value.trim();
    if (system) messages.push({ role: "system", content: system });
    for (const turn of this.turns) messages.push({ role: turn.role, content: turn.content });
    return {
      model: $("model").value,
      messages,
      temperature: numberInput("temperature", 0.7),
      top_p: numberInput("top-p", 1),
      max_tokens: Math.max(1, Math.round(numberInput("max-tokens", 256))),
      stream: true,
      stream_options: { include_usage: true },
    };
  }

  send() {
    const prompt = $("prompt");
    const text = prompt.value.trim();
    if (!text || this.controller) return;
    prompt.value = "";
    const view = messageView("user", "you");
    setText(view, text, false);
    this.messages.append(view);
    this.turns.push({ role: "user", content: text, view });
    this.answer();
  }

  regenerate() {
    if (this.controller) return;
    const last = this.turns[this.turns.length - 1];
    if (!last || last.role !== "assistant") return;
    this.turns.pop();
    last.view.remove();
    this.answer();
  }

  stop() {
    if (this.controller) this.controller.abort();
  }

  clear() {
    this.stop();
    this.turns = [];
    this.messages.replaceChildren();
    this.setBusy(false);
  }

  async answer() {
    const body = this.requestBody();
    const view = messageView("assistant", body.model);
    view.dataset.state = "streaming";
    this.messages.append(view);
    const controller = new AbortController();
    this.controller = controller;
    this.setBusy(true);
    const timing = { start: performance.now(), first: null, last: null, deltas: 0 };
    let text = "";
    let usage = null;
    let pending = false;
    const render = () => {
      pending = false;
      setText(view, text, true);
      view.scrollIntoView({ block: "end" });
    };
    try {
      await streamChat(body, controller.signal, (chunk) => {
        if (chunk.usage) usage = chunk.usage;
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (!delta || !delta.content) return;
        const now = performance.now();
        if (timing.first === null) timing.first = now;
        timing.last = now;
        timing.deltas += 1;
        text += delta.content;
        if (!pending) {
          pending = true; // NOTE: one render per frame, however fast deltas arrive
          requestAnimationFrame(render);
        }
      });
      view.dataset.state = "done";
    } catch (error) {
      if (error.name === "AbortError") {
        view.dataset.state = "stopped";
      } else {
        view.dataset.state = "error";
        view.dataset.error = error.message;
        if (error instanceof AuthError) this.onAuthError();
      }
    } finally {
      this.controller = null;
    }
    render();
    this.showStats(view, timing, usage, text);
    if (view.dataset.state === "error" && !text) {
      view.querySelector(".content").textContent = view.dataset.error;
    } else {
      this.turns.push({ role: "assistant", content: text, view });
    }
    this.setBusy(false);
  }

  showStats(view, timing, usage, text) {
    const meta = view.querySelector(".meta");
    const parts = [];
    const tokens = usage ? usage.completion_tokens : timing.deltas;
    view.dataset.tokens = String(tokens);
    parts.push(`${usage ? "" : "~"}${tokens} tokens`);
    if (usage) parts.push(`prompt ${usage.prompt_tokens}`);
    if (timing.first !== null) {
      const ttft = timing.first - timing.start;
      view.dataset.ttftMs = ttft.toFixed(1);
      parts.push(`TTFT ${ttft.toFixed(0)} ms`);
      const seconds = (timing.last - timing.first) / 1000;
      if (tokens > 1 && seconds > 0) {
        const rate = (tokens - 1) / seconds; // decode speed: tokens after the first
        view.dataset.tokensPerSecond = rate.toFixed(2);
        parts.push(`${rate.toFixed(1)} tok/s`);
      }
    }
    if (view.dataset.state === "stopped") parts.push("stopped");
    const stats = document.createElement("span");
    stats.className = "stats";
    stats.textContent = parts.join(" \u00b7 ");
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "quiet copy";
    copy.textContent = "Copy";
    copy.addEventListener("click", async () => {
      await copyText(text);
      copy.textContent = "Copied";
    });
    meta.replaceChildren(stats, copy);
  }
}
