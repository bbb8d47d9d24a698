// Small statistics for the soak's figures.

/**
 * Least-squares slope of y over x (units of y per unit of x), with the fit's R² and the number of
 * points; slope 0 with fewer than two distinct x.
 */
export function leastSquares(points: { x: number; y: number }[]): { slope: number; r2: number; n: number } {
  const n = points.length;
  if (n < 2) return { slope: 0, r2: 0, n };
  let sx = 0;
  let sy = 0;
  for (const p of points) {
    sx += p.x;
    sy += p.y;
  }
  const mx = sx / n;
  const my = sy / n;
  let sxx = 0;
  let sxy = 0;
  let syy = 0;
  for (const p of points) {
    sxx += (p.x - mx) ** 2;
    sxy += (p.x - mx) * (p.y - my);
    syy += (p.y - my) ** 2;
  }
  if (sxx === 0) return { slope: 0, r2: 0, n };
  const slope = sxy / sxx;
  const r2 = syy === 0 ? 0 : (sxy * sxy) / (sxx * syy);
  return { slope, r2, n };
}

/** The p-th percentile (0-100) by nearest rank; 0 for no samples. */
export function percentile(values: number[], p: number): number {
  if (values.length === 0) return 0;
  const sorted = values.slice().sort((a, b) => a - b);
  const rank = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[rank]!;
}

/** Sum of per-second counts over [fromSec, toSec), as a rate per minute. */
export function perMinute(perSecond: number[], fromSec: number, toSec: number): number {
  let total = 0;
  for (let s = Math.max(0, Math.floor(fromSec)); s < Math.ceil(toSec); s++) total += perSecond[s] ?? 0;
  const minutes = (toSec - fromSec) / 60;
  return minutes > 0 ? total / minutes : 0;
}
