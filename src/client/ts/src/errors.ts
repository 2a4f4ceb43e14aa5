// Every error the SDK rejects a promise with is a `RuyiError`; the subclass
// says what went wrong and its fields say the rest.

/** The base class of the SDK's errors. */
export class RuyiError extends Error {
  constructor(message: string) {
    super(message);
    this.name = new.target.name;
  }
}

/** The server refused the connection (`ConnAck` or `Disconnect` with a
 * reason other than Success), e.g. `AuthFailed`. */
export class ConnectRefusedError extends RuyiError {
  constructor(
    /** The reason code's name, e.g. `"AuthFailed"`. */
    readonly reason: string,
    readonly code: number,
  ) {
    super(`the server refused the connection: ${reason}`);
  }
}

/** The connection is closed for good (the client closed it, the server
 * kicked it, or reconnecting is off or gave up). */
export class ConnectionClosedError extends RuyiError {
  constructor(
    /** The reason the server gave, e.g. `"Kicked"`; `null` when it gave none. */
    readonly reason: string | null,
    readonly detail: string = '',
  ) {
    super(`the connection is closed${reason ? `: ${reason}` : ''}${detail ? ` (${detail})` : ''}`);
  }
}

/** Something did not happen within its time limit. */
export class TimeoutError extends RuyiError {
  constructor(
    readonly what: string,
    readonly timeoutMs: number,
  ) {
    super(`${what}: no answer within ${timeoutMs} ms`);
  }
}

/** The server broke the protocol (or sent bytes that are not frames). */
export class ProtocolError extends RuyiError {}

/** The server refused a send (its `SendAck` has a reason other than
 * Success); nothing was stored. */
export class SendRefusedError extends RuyiError {
  constructor(
    readonly reason: string,
    readonly code: number,
    readonly clientMsgNo: string,
  ) {
    super(`the server refused the send of ${clientMsgNo}: ${reason}`);
  }
}

/** The server answered a request (sync, conversation change, recall) with
 * a reason other than Success. */
export class RequestFailedError extends RuyiError {
  constructor(
    readonly request: string,
    readonly reason: string,
    readonly code: number,
  ) {
    super(`${request} failed: ${reason}`);
  }
}

/** The app did not take deliveries from `deliveries()` fast enough: more
 * than `incomingBufferMax` waited. The iterator ends with this error; the
 * connection and the callbacks go on. */
export class IncomingOverflowError extends RuyiError {
  constructor(readonly incomingBufferMax: number) {
    super(`more than ${incomingBufferMax} deliveries waited for the iterator (incomingBufferMax)`);
  }
}

/** `pendingSendsMax` sends are already waiting for their SendAck (the
 * connection is slow or down); this one was not queued. Retry later. */
export class PendingSendsFullError extends RuyiError {
  constructor(readonly pendingSendsMax: number) {
    super(`${pendingSendsMax} sends already wait for their SendAck (pendingSendsMax)`);
  }
}
