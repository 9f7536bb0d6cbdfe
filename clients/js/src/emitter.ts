/** A small event emitter: several handlers per name, `on` returns the function that removes it. */

type AnyHandler = (arg: any) => void;

export class Emitter {
  private readonly handlers = new Map<string, Set<AnyHandler>>();
  /** Where a throwing handler's exception goes (it never breaks the client's own work). */
  protected onHandlerError: (error: unknown, event: string) => void = (error) => {
    setTimeout(() => {
      throw error;
    }, 0);
  };

  protected addHandler(event: string, handler: AnyHandler): () => void {
    let set = this.handlers.get(event);
    if (!set) {
      set = new Set();
      this.handlers.set(event, set);
    }
    set.add(handler);
    return () => this.removeHandler(event, handler);
  }

  protected removeHandler(event: string, handler?: AnyHandler): void {
    if (!handler) {
      this.handlers.delete(event);
      return;
    }
    const set = this.handlers.get(event);
    if (!set) return;
    set.delete(handler);
    if (set.size === 0) this.handlers.delete(event);
  }

  protected hasHandlers(event: string): boolean {
    return (this.handlers.get(event)?.size ?? 0) > 0;
  }

  /** Calls every handler of `event`; returns whether there was one. */
  protected emitEvent(event: string, arg: unknown): boolean {
    const set = this.handlers.get(event);
    if (!set || set.size === 0) return false;
    for (const handler of [...set]) {
      try {
        handler(arg);
      } catch (error) {
        this.onHandlerError(error, event);
      }
    }
    return true;
  }
}
