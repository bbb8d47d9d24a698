// Where a message's header section ends.

/**
 * Offset just after the header section (after the line ending that precedes the blank line), or
 * -1 when the buffer holds no blank line yet. Bare LF line endings count too: stored bodies from
 * Postern's intake are CRLF, but a DSN may quote anything.
 */
export function headerSectionEnd(buf: Buffer): number {
  const crlf = buf.indexOf('\r\n\r\n');
  const lf = buf.indexOf('\n\n');
  if (crlf >= 0 && (lf < 0 || crlf < lf)) return crlf + 2;
  if (lf >= 0) return lf + 1;
  return -1;
}
