// Hand-drawn sparklines on a canvas: one polyline per series, a shared y scale from 0.

export const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706"];

// `series`: arrays of numbers or null (a gap), all as long as the history; `floor`: the
// smallest top of the y scale, so that an idle chart stays flat instead of showing noise.
export function drawSparkline(canvas, series, floor = 1) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (canvas.width !== width * ratio || canvas.height !== height * ratio) {
    canvas.width = width * ratio;
    canvas.height = height * ratio;
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const values = series.flat().filter((v) => typeof v === "number" && Number.isFinite(v));
  const top = Math.max(floor, ...values) * 1.1;
  const pad = 2;
  ctx.strokeStyle = "#e5e7eb";
  ctx.lineWidth = 1;
  ctx.beginPath();
  ctx.moveTo(0, height - pad);
  ctx.lineTo(width, height - pad);
  ctx.stroke();
  series.forEach((points, k) => {
    const n = points.length;
    if (n === 0) return;
    ctx.strokeStyle = COLORS[k % COLORS.length];
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    let drawing = false;
    points.forEach((v, i) => {
      if (typeof v !== "number" || !Number.isFinite(v)) {
        drawing = false;
        return;
      }
      const x = n === 1 ? width - pad : pad + ((width - 2 * pad) * i) / (n - 1);
      const y = height - pad - ((height - 2 * pad) * v) / top;
      if (drawing) ctx.lineTo(x, y);
      else ctx.moveTo(x, y);
      drawing = true;
    });
    ctx.stroke();
  });
}
