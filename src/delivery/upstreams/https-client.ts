// HTTPS requests to a provider's API (token endpoints, Microsoft Graph), with what Node's global
// fetch cannot take without an extra dependency: a CA of our own for the endpoint (ca_file: a
// private CA, or the stand-ins in tests), TLS 1.2 at least, and a keep-alive agent per upstream.
// Only https: every request carries a secret or a bearer token.
import https from 'node:https';

export interface HttpsOptions {
  /** PEM CAs to trust instead of the public ones. */
  ca?: string;
  /** Per request: connect, send, and the whole answer. */
  timeoutMs: number;
  agent?: https.Agent;
  /** Aborts the request (Postern shutting down). */
  signal?: AbortSignal;
}

export interface HttpsAnswer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: Buffer;
}

/** Answers larger than this are cut off: API answers here are small JSON documents. */
const MAX_ANSWER_BYTES = 1 << 20;

export function httpsRequest(
  url: string,
  request: { method: string; headers?: Record<string, string | number>; body?: Buffer | string },
  options: HttpsOptions,
): Promise<HttpsAnswer> {
  const target = new URL(url);
  if (target.protocol !== 'https:') return Promise.reject(new Error(`refusing to send credentials to ${target.origin}: not https`));
  return new Promise((resolve, reject) => {
    const body = request.body === undefined ? undefined : Buffer.isBuffer(request.body) ? request.body : Buffer.from(request.body, 'utf8');
    const req = https.request(
      target,
      {
        method: request.method,
        headers: { ...(body ? { 'content-length': body.length } : {}), ...request.headers },
        timeout: options.timeoutMs,
        minVersion: 'TLSv1.2',
        ...(options.ca ? { ca: options.ca } : {}),
        ...(options.agent ? { agent: options.agent } : {}),
        ...(options.signal ? { signal: options.signal } : {}),
      },
      (response) => {
        const chunks: Buffer[] = [];
        let size = 0;
        response.on('data', (chunk: Buffer) => {
          size += chunk.length;
          if (size > MAX_ANSWER_BYTES) req.destroy(new Error('answer too large'));
          else chunks.push(chunk);
        });
        response.on('end', () => resolve({ status: response.statusCode ?? 0, headers: response.headers, body: Buffer.concat(chunks) }));
        response.on('error', reject);
      },
    );
    // The whole exchange, not just idle time: a server that trickles must not hold a delivery.
    const deadline = setTimeout(() => req.destroy(new Error(`no complete answer within ${options.timeoutMs} ms`)), options.timeoutMs);
    req.on('close', () => clearTimeout(deadline));
    req.on('timeout', () => req.destroy(new Error(`no answer within ${options.timeoutMs} ms`)));
    req.on('error', reject);
    req.end(body);
  });
}

/** The JSON body of an answer, or undefined when it is not JSON. */
export function jsonBody(answer: HttpsAnswer): Record<string, unknown> | undefined {
  try {
    const value = JSON.parse(answer.body.toString('utf8')) as unknown;
    return value && typeof value === 'object' ? (value as Record<string, unknown>) : undefined;
  } catch {
    return undefined;
  }
}
