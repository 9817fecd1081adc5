#include "engine.h"

#include <signal.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

struct engine_soon {
  engine_timer_cb cb;
  void *payload;
  struct engine_soon *next;
};

struct engine_timer {
  engine *e;
  engine_timer_cb cb;
  void *payload;
  double due;        /* virtual clock: epoch seconds */
  uint64_t seq;
  size_t heap_index; /* virtual clock: position in e->heap */
  int is_virtual;
  uv_timer_t uv;     /* real clock */
  engine_timer *prev, *next; /* real timers still pending, for engine_close */
};

/* Pending real timers, so that closing the engine cancels them instead of
 * waiting for them to fire. */
static void pending_add(engine *e, engine_timer *t) {
  t->next = e->pending;
  if (e->pending)
    e->pending->prev = t;
  e->pending = t;
}

static void pending_remove(engine_timer *t) {
  if (t->prev)
    t->prev->next = t->next;
  else if (t->e->pending == t)
    t->e->pending = t->next;
  if (t->next)
    t->next->prev = t->prev;
  t->prev = t->next = NULL;
}

/* ---- virtual timers: a binary min-heap on (due, seq) ---- */

static int earlier(const engine_timer *a, const engine_timer *b) {
  if (a->due != b->due)
    return a->due < b->due;
  return a->seq < b->seq;
}

static void heap_swap(engine *e, size_t i, size_t j) {
  engine_timer *t = e->heap[i];
  e->heap[i] = e->heap[j];
  e->heap[j] = t;
  e->heap[i]->heap_index = i;
  e->heap[j]->heap_index = j;
}

static void heap_up(engine *e, size_t i) {
  while (i > 0 && earlier(e->heap[i], e->heap[(i - 1) / 2])) {
    heap_swap(e, i, (i - 1) / 2);
    i = (i - 1) / 2;
  }
}

static void heap_down(engine *e, size_t i) {
  for (;;) {
    size_t l = 2 * i + 1, r = l + 1, m = i;
    if (l < e->heap_len && earlier(e->heap[l], e->heap[m]))
      m = l;
    if (r < e->heap_len && earlier(e->heap[r], e->heap[m]))
      m = r;
    if (m == i)
      return;
    heap_swap(e, i, m);
    i = m;
  }
}

static void heap_remove(engine *e, size_t i) {
  e->heap_len--;
  if (i != e->heap_len) {
    e->heap[i] = e->heap[e->heap_len];
    e->heap[i]->heap_index = i;
    heap_down(e, i);
    heap_up(e, i);
  }
}

/* Runs when the loop is otherwise idle: pending I/O callbacks (a health check
 * answering, a router command completing) go first, then the clock jumps to
 * the earliest virtual timer. */
static void vidle_cb(uv_idle_t *h) {
  engine *e = h->data;
  if (e->heap_len == 0) {
    uv_idle_stop(&e->vidle);
    e->vidle_active = 0;
    return;
  }
  engine_timer *t = e->heap[0];
  if (t->due > e->vnow && e->holds > 0) {
    /* Time may not move while real work is in flight; engine_release
     * starts the idle handle again. */
    uv_idle_stop(&e->vidle);
    e->vidle_active = 0;
    return;
  }
  heap_remove(e, 0);
  if (t->due > e->vnow)
    e->vnow = t->due;
  engine_timer_cb cb = t->cb;
  void *payload = t->payload;
  free(t);
  cb(payload);
}

uv_async_t *volatile engine_wake_handle;

static void woken(uv_async_t *h) { (void)h; }

/* A peer that closes a socket while we write to it (HAProxy restarting
 * mid-command) must be an error the caller handles, never the death of the
 * process: libuv writes to Unix sockets with write(2), which raises
 * SIGPIPE. A host that chose its own disposition keeps it. */
static void ignore_sigpipe(void) {
  struct sigaction old;
  if (sigaction(SIGPIPE, NULL, &old) == 0 && old.sa_handler == SIG_DFL)
    signal(SIGPIPE, SIG_IGN);
}

int engine_init(engine *e, int virtual_clock) {
  ignore_sigpipe();
  memset(e, 0, sizeof *e);
  e->loop = malloc(sizeof *e->loop);
  if (!e->loop || uv_loop_init(e->loop) != 0) {
    free(e->loop);
    e->loop = NULL;
    return -1;
  }
  /* Active (and so keeping the loop alive) only while virtual timers pend. */
  uv_idle_init(e->loop, &e->vidle);
  e->vidle.data = e;
  /* Not counted as work: the loop may end while it is open. */
  uv_async_init(e->loop, &e->wake, woken);
  uv_unref((uv_handle_t *)&e->wake);
  engine_wake_handle = &e->wake;
  e->virtual_clock = virtual_clock;
  e->vnow = dc_wall_now();
  return 0;
}

static void walk_close(uv_handle_t *h, void *arg) {
  (void)arg;
  if (!uv_is_closing(h))
    uv_close(h, NULL);
}

void engine_close(engine *e) {
  if (!e->loop)
    return;
  if (e->http) {
    e->http_free(e->http);
    e->http = NULL;
  }
  for (size_t i = 0; i < e->heap_len; i++)
    free(e->heap[i]);
  while (e->pending)
    engine_timer_cancel(e->pending);
  while (e->soon) {
    struct engine_soon *next = e->soon->next;
    free(e->soon);
    e->soon = next;
  }
  e->soon_tail = NULL;
  free(e->heap);
  e->heap = NULL;
  e->heap_len = e->heap_cap = 0;
  uv_close((uv_handle_t *)&e->vidle, NULL);
  if (engine_wake_handle == &e->wake)
    engine_wake_handle = NULL;
  uv_close((uv_handle_t *)&e->wake, NULL);
  uv_run(e->loop, UV_RUN_DEFAULT);
  /* Anything a module left open is closed here so the loop can be freed;
   * their memory is theirs and was released by their own close callbacks. */
  if (uv_loop_close(e->loop) == UV_EBUSY) {
    uv_walk(e->loop, walk_close, NULL);
    uv_run(e->loop, UV_RUN_DEFAULT);
    uv_loop_close(e->loop);
  }
  free(e->loop);
  e->loop = NULL;
}

double engine_now(const engine *e) {
  return e->virtual_clock ? e->vnow : dc_wall_now();
}

int engine_set_virtual(engine *e, int on) {
  if (e->heap_len > 0)
    return -1;
  if (on && !e->virtual_clock)
    e->vnow = dc_wall_now();
  e->virtual_clock = on ? 1 : 0;
  return 0;
}

static void real_timer_closed(uv_handle_t *h) { free(h->data); }

static void real_timer_cb(uv_timer_t *h) {
  engine_timer *t = h->data;
  pending_remove(t);
  engine_timer_cb cb = t->cb;
  void *payload = t->payload;
  uv_close((uv_handle_t *)&t->uv, real_timer_closed);
  cb(payload);
}

static engine_timer *timer_start(engine *e, double seconds, engine_timer_cb cb, void *payload, int virtual_clock);

engine_timer *engine_timer_start(engine *e, double seconds, engine_timer_cb cb,
                                 void *payload) {
  return timer_start(e, seconds, cb, payload, e->virtual_clock);
}

engine_timer *engine_timer_start_real(engine *e, double seconds, engine_timer_cb cb, void *payload) {
  return timer_start(e, seconds, cb, payload, 0);
}

static engine_timer *timer_start(engine *e, double seconds, engine_timer_cb cb, void *payload, int virtual_clock) {
  engine_timer *t = calloc(1, sizeof *t);
  if (!t)
    return NULL;
  if (seconds < 0)
    seconds = 0;
  t->e = e;
  t->cb = cb;
  t->payload = payload;
  t->seq = e->seq++;
  if (!virtual_clock) {
    uv_timer_init(e->loop, &t->uv);
    t->uv.data = t;
    pending_add(e, t);
    uv_timer_start(&t->uv, real_timer_cb, (uint64_t)(seconds * 1000.0 + 0.5), 0);
    return t;
  }
  if (e->heap_len == e->heap_cap) {
    size_t cap = e->heap_cap ? e->heap_cap * 2 : 64;
    engine_timer **heap = realloc(e->heap, cap * sizeof *heap);
    if (!heap) {
      free(t);
      return NULL;
    }
    e->heap = heap;
    e->heap_cap = cap;
  }
  t->is_virtual = 1;
  t->due = e->vnow + seconds;
  t->heap_index = e->heap_len;
  e->heap[e->heap_len++] = t;
  heap_up(e, t->heap_index);
  if (!e->vidle_active) {
    uv_idle_start(&e->vidle, vidle_cb);
    e->vidle_active = 1;
  }
  return t;
}

void engine_timer_cancel(engine_timer *t) {
  if (!t)
    return;
  if (t->is_virtual) {
    heap_remove(t->e, t->heap_index);
    free(t);
    return;
  }
  pending_remove(t);
  uv_timer_stop(&t->uv);
  if (!uv_is_closing((uv_handle_t *)&t->uv))
    uv_close((uv_handle_t *)&t->uv, real_timer_closed);
}

void engine_hold(engine *e) { e->holds++; }

void engine_release(engine *e) {
  if (e->holds > 0)
    e->holds--;
  if (e->holds == 0 && e->heap_len > 0 && !e->vidle_active) {
    uv_idle_start(&e->vidle, vidle_cb);
    e->vidle_active = 1;
  }
}

int engine_soon(engine *e, engine_timer_cb cb, void *payload) {
  struct engine_soon *s = malloc(sizeof *s);
  if (!s)
    return -1;
  s->cb = cb;
  s->payload = payload;
  s->next = NULL;
  if (e->soon_tail)
    e->soon_tail->next = s;
  else
    e->soon = s;
  e->soon_tail = s;
  engine_hold(e);
  return 0;
}

/* The continuations queued before this turn; those they queue wait for the
 * next one, so a chain of them cannot starve the loop. */
static void run_soon(engine *e) {
  struct engine_soon *list = e->soon;
  e->soon = e->soon_tail = NULL;
  while (list) {
    struct engine_soon *s = list;
    list = s->next;
    engine_release(e);
    s->cb(s->payload);
    free(s);
  }
}

int engine_run_once(engine *e) {
  run_soon(e);
  int more = uv_run(e->loop, e->soon ? UV_RUN_NOWAIT : UV_RUN_ONCE);
  return more || e->soon != NULL;
}

void engine_outgoing(engine *e, int delta) {
  if (delta < 0 && e->outgoing < (size_t)-delta)
    e->outgoing = 0;
  else
    e->outgoing += (size_t)(ptrdiff_t)delta;
}

static void flush_deadline(void *payload) { *(int *)payload = 1; }

size_t engine_flush(engine *e, double max_seconds) {
  if (!e->loop || e->outgoing == 0)
    return e->outgoing;
  /* The deadline also wakes a loop that waits on a slow receiver. On the
   * virtual clock it comes after the retries' waits (they are shorter) and
   * requests in flight hold the clock, so deliveries get their chance. */
  int late = 0;
  engine_timer *t = engine_timer_start(e, max_seconds, flush_deadline, &late);
  while (e->outgoing > 0 && !late && engine_run_once(e))
    ;
  if (!late)
    engine_timer_cancel(t);
  return e->outgoing;
}
