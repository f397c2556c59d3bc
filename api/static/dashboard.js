// The live dashboard: /v1/stats polled every second while the tab is shown, as sparklines.

import { AuthError, getJSON } from "./api.js";
import { COLORS, drawSparkline } from "./sparkline.js";

const HISTORY = 120; // points per chart: two minutes at one poll a second
const POLL_MS = 1000;

const ms = (seconds) => (seconds == null ? null : seconds * 1000);
const percent = (share) => (share == null ? null : share * 100);

// Each chart: its series (label and how to read it from a /v1/stats view), unit and y floor.
const CHARTS = [
  { id: "output_tps", title: "Output tokens/s", unit: "tok/s", floor: 1,
    series: [["output", (s) => s.throughput.generation_tokens_per_s]] },
  { id: "prompt_tps", title: "Prompt tokens/s", unit: "tok/s", floor: 1,
    series: [["prefill", (s) => s.throughput.prompt_tokens_per_s]] },
  { id: "requests", title: "Requests", unit: "", floor: 1,
    series: [["running", (s) => s.requests.running], ["waiting", (s) => s.requests.waiting]] },
  { id: "kv_cache", title: "KV cache usage", unit: "%", floor: 5,
    series: [["used", (s) => percent(s.kv_cache.usage)]] },
  { id: "prefix_hit_rate", title: "Prefix-cache hit rate", unit: "%", floor: 5,
    series: [["hits", (s) => percent(s.prefix_cache.hit_rate)]] },
  { id: "ttft", title: "Time to first token", unit: "ms", floor: 10,
    series: [["p50", (s) => ms(s.latency.ttft_s.p50)], ["p95", (s) => ms(s.latency.ttft_s.p95)]] },
  { id: "itl", title: "Inter-token latency", unit: "ms", floor: 10,
    series: [["p50", (s) => ms(s.latency.itl_s.p50)], ["p95", (s) => ms(s.latency.itl_s.p95)]] },
];

function format(value, unit) {
  if (value == null) return "\u2014";
  const digits = Math.abs(value) >= 100 || Number.isInteger(value) ? 0 : 1;
  return `${value.toFixed(digits)}${unit ? " " + unit : ""}`;
}

function chartCard(chart) {
  const card = document.createElement("section");
  card.className = "card chart";
  card.dataset.metric = chart.id;
  const header = document.createElement("header");
  const title = document.createElement("h3");
  title.textContent = chart.title;
  const value = document.createElement("span");
  value.className = "value";
  value.textContent = "\u2014";
  header.append(title, value);
  const canvas = document.createElement("canvas");
  const legend = document.createElement("footer");
  legend.className = "legend";
  chart.series.forEach(([label], k) => {
    const key = document.createElement("span");
    key.className = `key key-${k}`;
    key.textContent = label;
    legend.append(key);
  });
  card.append(header, canvas, legend);
  return { card, value, canvas, history: chart.series.map(() => []) };
}

function drawBars(container, values) {
  const entries = Object.entries(values).sort((a, b) => b[1] - a[1]);
  const top = Math.max(1e-9, ...entries.map(([, v]) => v));
  if (!entries.length) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = "nothing yet";
    container.replaceChildren(empty);
    return;
  }
  container.replaceChildren(
    ...entries.map(([name, seconds], k) => {
      const row = document.createElement("div");
      row.className = "bar-row";
      row.dataset.name = name;
      row.dataset.seconds = String(seconds);
      const label = document.createElement("span");
      label.className = "bar-label";
      label.textContent = name;
      const track = document.createElement("span");
      track.className = "bar-track";
      const fill = document.createElement("span");
      fill.className = "bar-fill";
      fill.style.width = `${(100 * seconds) / top}%`;
      fill.style.background = COLORS[k % COLORS.length];
      track.append(fill);
      const amount = document.createElement("span");
      amount.className = "bar-value";
      amount.textContent = `${seconds.toFixed(seconds >= 10 ? 1 : 3)} s`;
      row.append(label, track, amount);
      return row;
    }),
  );
}

export class Dashboard {
  constructor(onAuthError) {
    this.onAuthError = onAuthError;
    this.timer = null;
    this.inFlight = false;
    this.views = CHARTS.map(chartCard);
    document.getElementById("charts").append(...this.views.map((v) => v.card));
    this.updated = document.getElementById("dashboard-updated");
  }

  start() {
    if (this.timer !== null) return;
    this.poll();
    this.timer = setInterval(() => this.poll(), POLL_MS);
  }

  stop() {
    clearInterval(this.timer);
    this.timer = null;
  }

  async poll() {
    // NOTE: a slow answer never stacks polls up; a hidden browser tab does not poll
    if (this.inFlight || document.hidden) return;
    this.inFlight = true;
    try {
      const stats = await getJSON("/v1/stats");
      this.show(stats);
      const { rates, latency } = stats.window_s;
      this.updated.textContent = `updated ${new Date().toLocaleTimeString()} \u00b7 rates over ` +
        `the last ${rates} s, latencies over the last ${latency} s`;
      this.updated.classList.remove("error");
    } catch (error) {
      this.updated.textContent = `not updated: ${error.message}`;
      this.updated.classList.add("error");
      if (error instanceof AuthError) {
        this.stop();
        this.onAuthError();
      }
    } finally {
      this.inFlight = false;
    }
  }

  show(stats) {
    CHARTS.forEach((chart, i) => {
      const view = this.views[i];
      chart.series.forEach(([, read], k) => {
        const points = view.history[k];
        points.push(read(stats));
        if (points.length > HISTORY) points.shift();
      });
      const latest = view.history.map((points) => points[points.length - 1]);
      const first = view.history[0].filter((v) => v != null);
      view.card.dataset.last = String(latest[0] ?? "");
      view.card.dataset.peak = String(first.length ? Math.max(...first) : "");
      view.value.textContent = latest.map((v) => format(v, chart.unit)).join(" / ");
      drawSparkline(view.canvas, view.history, chart.floor);
    });
    document.querySelectorAll("[data-bars]").forEach((card) => {
      drawBars(card.querySelector(".bars"), stats.gpu_seconds[card.dataset.bars] || {});
    });
  }
}
