/* libcurl's multi interface driven by a libuv loop, after curl's
 * docs/examples/multi-uv.c: the socket callback keeps one uv_poll_t per
 * socket, the timer callback drives one uv_timer_t, and every
 * curl_multi_socket_action is followed by a drain of curl_multi_info_read. */
#include "http.h"

#include <pthread.h>

#include "engine.h"
#include <stdlib.h>

/* One socket curl asked us to watch. Lives until its poll handle's close
 * callback, which may run after h is freed: that callback frees only this. */
typedef struct sock_ctx {
  uv_poll_t poll;
  curl_socket_t fd;
  http *h;
  struct sock_ctx *prev, *next; /* h->socks: contexts not yet closing */
} sock_ctx;

/* One transfer in flight; reached from the easy handle by CURLOPT_PRIVATE. */
typedef struct transfer {
  CURL *easy;
  http_done_cb cb;
  void *payload;
  struct transfer *prev, *next; /* h->transfers */
} transfer;

struct http {
  uv_loop_t *loop;
  CURLM *multi;
  uv_timer_t *timer;     /* heap-allocated: its close callback outlives h */
  sock_ctx *socks;
  transfer *transfers;
  int active;
  int dispatching;       /* > 0 while done callbacks run (they may free h) */
  int freeing;           /* http_free has started; nothing new is accepted */
};

static pthread_once_t global_once = PTHREAD_ONCE_INIT;
static CURLcode global_rc = CURLE_FAILED_INIT;

static void global_init(void) { global_rc = curl_global_init(CURL_GLOBAL_ALL); }

static void free_handle_cb(uv_handle_t *handle) { free(handle->data); }

/* ---- transfers ---------------------------------------------------------- */

static void transfer_unlink(http *h, transfer *t) {
  if (t->prev)
    t->prev->next = t->next;
  else
    h->transfers = t->next;
  if (t->next)
    t->next->prev = t->prev;
  h->active--;
}

/* Detach the transfer from curl and from h before its callback runs: the
 * callback owns the easy handle again and may clean it up or re-add it. */
static void transfer_end(http *h, transfer *t, CURLcode result) {
  CURL *easy = t->easy;
  http_done_cb cb = t->cb;
  void *payload = t->payload;
  curl_multi_remove_handle(h->multi, easy);
  curl_easy_setopt(easy, CURLOPT_PRIVATE, NULL); /* t is about to go */
  transfer_unlink(h, t);
  free(t);
  cb(easy, result, payload);
}

/* A callback may call http_free; then h stays allocated until the drain
 * returns and frees it here. */
static void drain_done(http *h) {
  h->dispatching++;
  while (!h->freeing) {
    int pending = 0;
    CURLMsg *msg = curl_multi_info_read(h->multi, &pending);
    if (!msg)
      break;
    if (msg->msg != CURLMSG_DONE)
      continue;
    char *priv = NULL;
    curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, &priv);
    if (priv)
      transfer_end(h, (transfer *)priv, msg->data.result);
    else /* not added by http_add: nobody to tell */
      curl_multi_remove_handle(h->multi, msg->easy_handle);
  }
  h->dispatching--;
  if (h->freeing && h->dispatching == 0)
    free(h);
}

static void socket_action(http *h, curl_socket_t fd, int flags) {
  int running = 0;
  curl_multi_socket_action(h->multi, fd, flags, &running);
  drain_done(h);
}

/* ---- sockets ------------------------------------------------------------ */

static void on_poll(uv_poll_t *poll, int status, int events) {
  sock_ctx *s = poll->data;
  int flags = 0;
  if (status < 0)
    flags = CURL_CSELECT_ERR;
  if (events & UV_READABLE)
    flags |= CURL_CSELECT_IN;
  if (events & UV_WRITABLE)
    flags |= CURL_CSELECT_OUT;
  socket_action(s->h, s->fd, flags);
}

static sock_ctx *sock_open(http *h, curl_socket_t fd) {
  sock_ctx *s = calloc(1, sizeof *s);
  if (!s)
    return NULL;
  if (uv_poll_init_socket(h->loop, &s->poll, fd) != 0) {
    free(s);
    return NULL;
  }
  s->fd = fd;
  s->h = h;
  s->poll.data = s;
  s->next = h->socks;
  if (h->socks)
    h->socks->prev = s;
  h->socks = s;
  return s;
}

/* Unlinking at once (not in the close callback) keeps h->socks to the
 * contexts that are still usable, so nothing finds a closing poll handle. */
static void sock_close(http *h, sock_ctx *s) {
  if (s->prev)
    s->prev->next = s->next;
  else
    h->socks = s->next;
  if (s->next)
    s->next->prev = s->prev;
  uv_close((uv_handle_t *)&s->poll, free_handle_cb);
}

static int sock_watch(http *h, curl_socket_t fd, int action, sock_ctx *s) {
  /* A context whose handle is closing is never handed back to curl (we
   * unassign it when we close it), but check rather than trust. */
  if (!s || uv_is_closing((uv_handle_t *)&s->poll)) {
    s = sock_open(h, fd);
    if (!s)
      return -1;
    curl_multi_assign(h->multi, fd, s);
  }
  int events = 0;
  if (action & CURL_POLL_IN)
    events |= UV_READABLE;
  if (action & CURL_POLL_OUT)
    events |= UV_WRITABLE;
  return uv_poll_start(&s->poll, events, on_poll) == 0 ? 0 : -1;
}

static int on_socket(CURL *easy, curl_socket_t fd, int action, void *userp,
                     void *socketp) {
  (void)easy;
  http *h = userp;
  sock_ctx *s = socketp;
  if (action != CURL_POLL_REMOVE)
    return sock_watch(h, fd, action, s);
  if (s && !uv_is_closing((uv_handle_t *)&s->poll)) {
    sock_close(h, s);
    curl_multi_assign(h->multi, fd, NULL);
  }
  return 0;
}

/* ---- timer -------------------------------------------------------------- */

static void on_timer(uv_timer_t *timer) {
  socket_action(timer->data, CURL_SOCKET_TIMEOUT, 0);
}

/* timeout_ms 0 asks for socket_action "now"; calling it from inside this
 * callback would recurse into curl, so a 0 ms timer runs it on the next loop
 * iteration instead. */
static int on_timeout_change(CURLM *multi, long timeout_ms, void *userp) {
  (void)multi;
  http *h = userp;
  if (timeout_ms < 0 || h->freeing) {
    uv_timer_stop(h->timer);
    return 0;
  }
  return uv_timer_start(h->timer, on_timer, (uint64_t)timeout_ms, 0) == 0 ? 0
                                                                           : -1;
}

/* ---- public ------------------------------------------------------------- */

static int multi_setup(http *h) {
  h->multi = curl_multi_init();
  if (!h->multi)
    return -1;
  curl_multi_setopt(h->multi, CURLMOPT_SOCKETFUNCTION, on_socket);
  curl_multi_setopt(h->multi, CURLMOPT_SOCKETDATA, h);
  curl_multi_setopt(h->multi, CURLMOPT_TIMERFUNCTION, on_timeout_change);
  curl_multi_setopt(h->multi, CURLMOPT_TIMERDATA, h);
  return 0;
}

http *http_new(uv_loop_t *loop) {
  pthread_once(&global_once, global_init);
  if (global_rc != CURLE_OK || !loop)
    return NULL;
  http *h = calloc(1, sizeof *h);
  uv_timer_t *timer = calloc(1, sizeof *timer);
  if (!h || !timer || uv_timer_init(loop, timer) != 0) {
    free(h);
    free(timer);
    return NULL;
  }
  h->loop = loop;
  h->timer = timer;
  timer->data = h;
  if (multi_setup(h) != 0) {
    timer->data = timer;
    uv_close((uv_handle_t *)timer, free_handle_cb);
    free(h);
    return NULL;
  }
  return h;
}

/* Always take the head: a callback may add or finish other transfers, so no
 * iterator survives it. */
static void abort_transfers(http *h) {
  while (h->transfers)
    transfer_end(h, h->transfers, CURLE_ABORTED_BY_CALLBACK);
}

void http_free(http *h) {
  if (!h || h->freeing)
    return;
  h->freeing = 1;
  abort_transfers(h);
  /* curl_multi_cleanup closes cached connections and may still call
   * on_socket with CURL_POLL_REMOVE, so h and its list live until after it. */
  curl_multi_cleanup(h->multi);
  h->multi = NULL;
  while (h->socks)
    sock_close(h, h->socks);
  h->timer->data = h->timer;
  uv_close((uv_handle_t *)h->timer, free_handle_cb);
  if (h->dispatching == 0)
    free(h);
}

int http_add(http *h, CURL *easy, http_done_cb cb, void *payload) {
  if (!h || !easy || !cb || h->freeing)
    return -1;
  transfer *t = calloc(1, sizeof *t);
  if (!t)
    return -1;
  t->easy = easy;
  t->cb = cb;
  t->payload = payload;
  curl_easy_setopt(easy, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(easy, CURLOPT_PRIVATE, (char *)t);
  if (curl_multi_add_handle(h->multi, easy) != CURLM_OK) {
    curl_easy_setopt(easy, CURLOPT_PRIVATE, NULL);
    free(t);
    return -1;
  }
  t->next = h->transfers;
  if (h->transfers)
    h->transfers->prev = t;
  h->transfers = t;
  h->active++;
  return 0;
}

int http_active(const http *h) { return h ? h->active : 0; }

int http_remove(http *h, CURL *easy) {
  char *priv = NULL;
  if (!h || !easy || h->freeing)
    return -1;
  curl_easy_getinfo(easy, CURLINFO_PRIVATE, &priv);
  if (!priv)
    return -1;
  transfer *t = (transfer *)priv;
  curl_multi_remove_handle(h->multi, easy);
  curl_easy_setopt(easy, CURLOPT_PRIVATE, NULL);
  transfer_unlink(h, t);
  free(t);
  return 0;
}

static void engine_http_free(void *h) { http_free(h); }

http *http_engine_client(engine *e) {
  if (!e->http) {
    e->http = http_new(e->loop);
    e->http_free = engine_http_free;
  }
  return e->http;
}
