// `postern queue list|show|retry|delete`: look at what waits for delivery and act on it. Works on
// the store directly, so a running server picks the change up at its next scheduling tick.
// `retry` and `delete` change what is delivered: each writes an audit entry (who, what), like the
// account commands.
import type { Command } from 'commander';
import { UsageError, actor, formatTime, printJson, printTable, withStore } from './cli-context.js';

export function registerQueueCommands(program: Command): void {
  const queue = program.command('queue').description('inspect and act on the delivery queue');

  queue
    .command('list')
    .description('messages still waiting for delivery to one or more recipients')
    .option('--json', 'machine-readable output')
    .action(async (opts: { json?: boolean }, cmd: Command) => {
      const { rows, counts } = await withStore(cmd, async (store) => ({
        rows: await store.listQueue(),
        counts: await store.countRecipients(),
      }));
      if (opts.json) return printJson({ messages: rows, recipients: counts });
      if (rows.length === 0) {
        process.stdout.write('The queue is empty.\n');
        return;
      }
      printTable(
        ['QUEUE ID', 'RECEIVED', 'SIZE', 'FROM', 'PENDING', 'NEXT ATTEMPT', 'LAST REPLY'],
        rows.map((r) => [
          r.queueId,
          formatTime(r.receivedAt),
          String(r.size),
          r.sender || '<>',
          `${r.pending}/${r.recipients}`,
          formatTime(r.nextAttemptAt),
          (r.lastResponse ?? '').slice(0, 60),
        ]),
      );
      process.stdout.write(
        `\n${rows.length} message(s); recipients: ${counts.queued} queued, ${counts.in_flight} in flight, ${counts.deferred} deferred\n`,
      );
    });

  queue
    .command('show <queueId>')
    .description('one message: envelope, origin and the state of each recipient')
    .option('--json', 'machine-readable output')
    .action(async (queueId: string, opts: { json?: boolean }, cmd: Command) => {
      const message = await withStore(cmd, (store) => store.getMessage(queueId));
      if (!message) throw new UsageError(`no message ${queueId} in the queue`);
      if (opts.json) return printJson(message);
      const o = message.origin;
      process.stdout.write(
        [
          `Queue ID:    ${message.queueId}`,
          `Message-ID:  ${message.messageIdHeader ?? '-'}`,
          `From:        ${message.sender || '<>'}`,
          `Size:        ${message.size} bytes`,
          `Received:    ${formatTime(message.receivedAt)} on ${o.listener} from ${o.clientIp}${o.account ? ` as ${o.account}` : ''} (session ${o.sessionId})`,
          `Expires:     ${formatTime(message.expiresAt)}`,
          '',
        ].join('\n'),
      );
      printTable(
        ['RECIPIENT', 'STATE', 'ATTEMPTS', 'NEXT ATTEMPT', 'LAST REPLY'],
        message.recipients.map((r) => [
          r.address,
          r.state,
          String(r.attempts),
          r.state === 'queued' || r.state === 'deferred' ? formatTime(r.nextAttemptAt) : '-',
          r.lastResponse ?? '-',
        ]),
      );
    });

  queue
    .command('retry [queueId]')
    .description('try pending recipients now (one message, or all with --all)')
    .option('--all', 'every pending message')
    .action(async (queueId: string | undefined, opts: { all?: boolean }, cmd: Command) => {
      if (!queueId && !opts.all) throw new UsageError('give a queue id, or --all for every pending message');
      const touched = await withStore(cmd, async (store) => {
        if (queueId && !(await store.getMessage(queueId))) throw new UsageError(`no message ${queueId} in the queue`);
        const n = await store.retryNow(queueId, Date.now());
        await store.recordAudit({ actor: actor(), action: 'queue.retry', target: queueId ?? 'all', detail: { recipients: n } });
        return n;
      });
      process.stdout.write(`${touched} recipient(s) scheduled for delivery now.\n`);
    });

  queue
    .command('delete <queueId>')
    .description('remove a message from the queue without delivering it (no bounce is sent)')
    .action(async (queueId: string, _opts: unknown, cmd: Command) => {
      const deleted = await withStore(cmd, async (store) => {
        // What was thrown away, for the record: the envelope, never the content.
        const message = await store.getMessage(queueId);
        if (!message || !(await store.deleteMessage(queueId))) return false;
        await store.recordAudit({
          actor: actor(),
          action: 'queue.delete',
          target: queueId,
          detail: {
            sender: message.sender,
            recipients: message.recipients.map((r) => r.address),
            pending: message.recipients.filter((r) => r.state !== 'delivered' && r.state !== 'failed').length,
            account: message.origin.account ?? null,
            received: new Date(message.receivedAt).toISOString(),
          },
        });
        return true;
      });
      if (!deleted) throw new UsageError(`no message ${queueId} in the queue`);
      process.stdout.write(`Message ${queueId} deleted.\n`);
    });
}
