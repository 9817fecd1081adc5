#include "outbox.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

typedef struct post {
  webhook w;
  char label[64];
  char what[128];
  json_t *body;
  struct post *next;
} post;

struct outbox {
  engine *e;
  post *head, *tail;
  size_t n;
  webhook_call *call;      /* the head's delivery in flight */
  int released;
};

outbox *outbox_new(engine *e) {
  outbox *b = calloc(1, sizeof *b);
  if (b)
    b->e = e;
  return b;
}

static void post_free(outbox *b, post *p) {
  engine_outgoing(b->e, -1);
  json_decref(p->body);
  explicit_bzero(&p->w, sizeof p->w);
  free(p);
}

static void say_dropped(const post *p, const char *why) {
  char url[256], line[DC_ERR_MAX + 512];
  dc_redact_url(url, sizeof url, p->w.url);
  dc_fmt(line, sizeof line, "deployctl: %s to %s dropped: %s", p->what, url, why);
  dc_redact(line);
  fprintf(stderr, "%s\n", line);
}

static void send_next(outbox *b);

static void sent(void *payload, const webhook_answer *a) {
  outbox *b = payload;
  post *p = b->head;
  b->call = NULL;
  if (!a->ok) {
    char why[DC_ERR_MAX + 64];
    dc_fmt(why, sizeof why, "%s after %d attempt%s", a->detail, a->attempts, a->attempts == 1 ? "" : "s");
    say_dropped(p, why);
  }
  b->head = p->next;
  if (!b->head)
    b->tail = NULL;
  b->n--;
  post_free(b, p);
  send_next(b);
}

static void send_next(outbox *b) {
  while (b->head && !b->call) {
    post *p = b->head;
    b->call = webhook_call_start(b->e, &p->w, p->label[0] ? p->label : NULL, p->body, p->w.retries, sent, b);
    if (b->call)
      return;
    say_dropped(p, "out of memory");
    b->head = p->next;
    if (!b->head)
      b->tail = NULL;
    b->n--;
    post_free(b, p);
  }
  if (!b->head && b->released)
    free(b);
}

void outbox_post(outbox *b, const webhook *w, const char *label, json_t *body, const char *what) {
  if (!b || !body) {
    json_decref(body);
    return;
  }
  post *p = calloc(1, sizeof *p);
  if (!p || b->n >= OUTBOX_MAX) {
    if (p) {
      engine_outgoing(b->e, 1); /* post_free uncounts it */
      p->w = *w;
      dc_strlcpy(p->what, what, sizeof p->what);
      say_dropped(p, "too many waiting already (the receiver is slow or down)");
      p->body = body;
      post_free(b, p);
    } else {
      json_decref(body);
    }
    return;
  }
  engine_outgoing(b->e, 1);
  p->w = *w;
  dc_strlcpy(p->label, label ? label : "", sizeof p->label);
  dc_strlcpy(p->what, what, sizeof p->what);
  p->body = body;
  if (b->tail)
    b->tail->next = p;
  else
    b->head = p;
  b->tail = p;
  b->n++;
  send_next(b);
}

void outbox_release(outbox *b) {
  if (!b)
    return;
  b->released = 1;
  if (!b->head && !b->call)
    free(b);
}
