// A PNG of the loss curve at the end of training (people look rather than read): an SVG drawn here and
// rendered by sharp, written atomically.
import { renameSync } from 'node:fs';
import sharp from 'sharp';

export interface LossPoint { step: number; loss: number }

export function lossCurveSvg(points: LossPoint[], width = 640, height = 360): string {
  const pad = { left: 60, right: 20, top: 30, bottom: 40 };
  const steps = points.map((p) => p.step);
  const losses = points.map((p) => p.loss);
  const [x0, x1] = [Math.min(...steps), Math.max(...steps, Math.min(...steps) + 1)];
  const [y0, y1] = [Math.min(...losses), Math.max(...losses)];
  const yr = y1 - y0 || Math.abs(y1) || 1;
  const sx = (s: number) => pad.left + ((s - x0) / (x1 - x0)) * (width - pad.left - pad.right);
  const sy = (l: number) => height - pad.bottom - ((l - y0) / yr) * (height - pad.top - pad.bottom);
  const line = points.map((p) => `${sx(p.step).toFixed(1)},${sy(p.loss).toFixed(1)}`).join(' ');
  const label = (v: number) => (Math.abs(v) >= 100 || Math.abs(v) < 0.01 ? v.toExponential(2) : v.toFixed(3));
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}">
<rect width="100%" height="100%" fill="white"/>
<text x="${width / 2}" y="20" font-family="sans-serif" font-size="14" text-anchor="middle">train_loss</text>
<line x1="${pad.left}" y1="${height - pad.bottom}" x2="${width - pad.right}" y2="${height - pad.bottom}" stroke="black"/>
<line x1="${pad.left}" y1="${pad.top}" x2="${pad.left}" y2="${height - pad.bottom}" stroke="black"/>
<text x="${pad.left - 5}" y="${sy(y1) + 4}" font-family="sans-serif" font-size="11" text-anchor="end">${label(y1)}</text>
<text x="${pad.left - 5}" y="${sy(y0) + 4}" font-family="sans-serif" font-size="11" text-anchor="end">${label(y0)}</text>
<text x="${pad.left}" y="${height - pad.bottom + 16}" font-family="sans-serif" font-size="11" text-anchor="middle">${x0}</text>
<text x="${width - pad.right}" y="${height - pad.bottom + 16}" font-family="sans-serif" font-size="11" text-anchor="middle">${x1}</text>
<text x="${width / 2}" y="${height - 8}" font-family="sans-serif" font-size="12" text-anchor="middle">step</text>
<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="${line}"/>
</svg>`;
}

/** Writes the loss curve to `path` (PNG); nothing is written for fewer than two points. */
export async function saveLossPlot(path: string, points: LossPoint[]): Promise<string | null> {
  const finite = points.filter((p) => Number.isFinite(p.loss));
  if (finite.length < 2) return null;
  const tmp = `${path}.tmp-${process.pid}.png`;
  await sharp(Buffer.from(lossCurveSvg(finite))).png().toFile(tmp);
  renameSync(tmp, path);
  return path;
}
