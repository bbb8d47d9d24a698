// Queues a message Postern writes itself (bounces, security alerts): the same durable path as
// mail from clients, so it is retried, traced and never lost either.
import { newQueueId } from '../store/queue-id.js';
import type { NewMessage, QueueStore } from '../store/store.js';

export interface LocalMessage {
  /** The complete message, headers and body, with CRLF line endings. */
  build(messageId: string): Buffer;
  sender: string;
  recipients: string[];
  hostname: string;
  now: number;
  lifetime: number;
  origin: NewMessage['origin'];
}

export async function enqueueLocalMessage(store: QueueStore, message: LocalMessage): Promise<string> {
  const queueId = newQueueId(message.now);
  const messageId = `${queueId}@${message.hostname}`;
  const writer = store.createBody(queueId);
  try {
    writer.stream.end(message.build(messageId));
    const size = await writer.finish();
    await store.enqueue({
      queueId,
      sender: message.sender,
      recipients: message.recipients.map((address) => ({ address })),
      size,
      receivedAt: message.now,
      expiresAt: message.now + message.lifetime,
      origin: message.origin,
      messageIdHeader: `<${messageId}>`,
    });
    return queueId;
  } catch (err) {
    await writer.abort().catch(() => undefined);
    throw err;
  }
}
