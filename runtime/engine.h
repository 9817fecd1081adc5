/* The engine: one libuv loop that every deployment, health check, router
 * command and child process of this process runs on, and the clock.
 *
 * The clock is either real (timers are libuv timers) or virtual: a timer due
 * in N seconds fires as soon as the loop has nothing more urgent to do, and
 * the virtual "now" jumps to its due time. Virtual timers fire in due-time
 * order, so three deployments waiting 300 s each in parallel all wake at
 * virtual t+300, as they would in real time. */
#ifndef DEPLOY_ENGINE_H
#define DEPLOY_ENGINE_H

#include <uv.h>

typedef struct engine engine;
typedef struct engine_timer engine_timer;
typedef void (*engine_timer_cb)(void *payload);


struct engine {
  uv_loop_t *loop;
  int virtual_clock;
  double vnow;                 /* virtual epoch seconds (virtual clock only) */
  struct engine_timer **heap;  /* virtual timers, min-heap on due time */
  size_t heap_len, heap_cap;
  uint64_t seq;                /* ties between equal due times keep FIFO order */
  uv_idle_t vidle;             /* fires the earliest virtual timer */
  int vidle_active;
  void *http;                  /* the HTTP module's client on this loop (made on first use) */
  void (*http_free)(void *http);
  int holds;                   /* real work in flight that the virtual clock waits for */
  uv_async_t wake;             /* woken by signal handlers (uv_async_send is async-signal-safe) */
  struct engine_timer *pending;/* real timers not yet fired */
  struct engine_soon *soon, *soon_tail; /* continuations for the next turn */
  size_t outgoing;             /* deliveries the process should not exit before (engine_flush) */
};

/* The most recently initialised engine's wake-up handle, for a signal
 * handler that wants the loop to notice an interrupt at once. */
extern uv_async_t *volatile engine_wake_handle;

/* Creates the engine's own loop. virtual_clock: 0 real, 1 virtual. */
int engine_init(engine *e, int virtual_clock);
/* Runs the loop until every handle the engine owns is closed, then frees. */
void engine_close(engine *e);

/* Epoch seconds: wall time, or virtual time. */
double engine_now(const engine *e);
/* Switch between clocks (only while no timer is pending). */
int engine_set_virtual(engine *e, int on);

/* Fire cb(payload) after `seconds` on the engine's clock. The returned
 * handle is valid until the callback has run or engine_timer_cancel. */
engine_timer *engine_timer_start(engine *e, double seconds, engine_timer_cb cb,
                                 void *payload);
/* The same on the real clock whichever clock the engine runs: for real
 * work that the virtual clock waits for (a process starting up), polled
 * in real time while the engine is held. */
engine_timer *engine_timer_start_real(engine *e, double seconds, engine_timer_cb cb, void *payload);
/* Cancel a pending timer; its callback never runs. NULL is ignored. */
void engine_timer_cancel(engine_timer *t);

/* Runs cb(payload) at the start of the loop's next turn, after the host
 * (the Lua scheduler) had its turn: a continuation that must not overtake
 * what the current turn handed to the host (an event handler). Holds the
 * virtual clock until it has run. Returns -1 when out of memory. */
int engine_soon(engine *e, engine_timer_cb cb, void *payload);

/* Real work in flight (a health check, a router command, a process being
 * stopped) holds the virtual clock: it does not jump to the next timer
 * until that work is done, so simulated rollouts running side by side see
 * the same timeline they would in real time. No effect on the real clock. */
void engine_hold(engine *e);
void engine_release(engine *e);

/* Runs the continuations queued with engine_soon, then one iteration of the
 * loop (blocking for I/O only when no continuation is left). Returns 0 when
 * there is no more work at all. */
int engine_run_once(engine *e);

/* Deliveries nobody waits for (notifications, event webhooks) that should
 * still leave before the process exits: the outbox counts them here, and
 * engine_flush runs the loop until none is left or max_seconds have passed
 * on the real clock. Returns how many are left (0: all went or were
 * dropped). */
void engine_outgoing(engine *e, int delta);
size_t engine_flush(engine *e, double max_seconds);

#endif
