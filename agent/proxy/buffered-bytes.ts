// The node-wide count of bytes that the proxies buffer in memory, which --max-buffered-bytes bounds.

/**
 * Bytes that the proxies have read and not yet written, node-wide. The copy adds a chunk when it
 * writes it to the other side and subtracts it when the write completes or the connection ends.
 */
export class BufferedBytes {
  #bytes = 0;

  constructor(readonly max: number) {}

  /** Bytes held now. */
  get bytes(): number {
    return this.#bytes;
  }

  /** Returns whether the proxies buffer more than the limit, so that new connections are refused. */
  get exceeded(): boolean {
    return this.#bytes > this.max;
  }

  /** Counts bytes handed to a write that has not completed yet. */
  add(bytes: number): void {
    this.#bytes += bytes;
  }

  /** Stops counting bytes whose write completed, or whose connection ended. */
  subtract(bytes: number): void {
    this.#bytes -= bytes;
  }
}
