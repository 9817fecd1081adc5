#include "notify.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "outbox.h"
#include "util.h"

static const char *const severity_names[] = {"info", "warning", "error"};

/* ---- declarations ---- */

static int fail(char *field, size_t fsize, const char *name, char *err, const char *msg) {
  dc_strlcpy(field, name, fsize);
  dc_strlcpy(err, msg, DC_ERR_MAX);
  return -1;
}

int notify_add(notify_list *l, const notify_spec *s, char *field, size_t fsize, char *err) {
  char msg[DC_ERR_MAX];
  notify_dest d;
  memset(&d, 0, sizeof d);
  if (l->n >= NOTIFY_MAX) {
    dc_fmt(msg, sizeof msg, "holds more than %d destinations: keep the list short", NOTIFY_MAX);
    return fail(field, fsize, "", err, msg);
  }
  int rc = -1;
  if (webhook_endpoint(&d.to, s->url, s->secret, s->timeout, s->retries, WEBHOOK_TRUSTED, field, fsize, err) != 0)
    goto out;
  if (!s->format || strcmp(s->format, "slack") == 0) {
    d.format = NOTIFY_SLACK;
  } else if (strcmp(s->format, "json") == 0) {
    d.format = NOTIFY_JSON;
  } else {
    char *shown = dc_printable(s->format);
    dc_fmt(msg, sizeof msg, "'%.32s' is not a format (known: slack, json)", shown ? shown : "?");
    free(shown);
    fail(field, fsize, "format", err, msg);
    goto out;
  }
  d.severity = NOTIFY_INFO;
  if (s->severity) {
    int found = 0;
    for (int i = 0; i < 3; i++) {
      if (strcmp(s->severity, severity_names[i]) == 0) {
        d.severity = (notify_severity)i;
        found = 1;
      }
    }
    if (!found) {
      char *shown = dc_printable(s->severity);
      dc_fmt(msg, sizeof msg, "'%.32s' is not a severity (known: info, warning, error: the least severe event "
             "sent)", shown ? shown : "?");
      free(shown);
      fail(field, fsize, "severity", err, msg);
      goto out;
    }
  }
  notify_dest *g = realloc(l->v, (l->n + 1) * sizeof *g);
  if (!g) {
    fail(field, fsize, "", err, "could not be kept: out of memory");
    goto out;
  }
  l->v = g;
  l->v[l->n++] = d;
  rc = 0;
out:
  explicit_bzero(&d, sizeof d);
  return rc;
}

void notify_list_clear(notify_list *l) {
  if (!l)
    return;
  if (l->v)
    explicit_bzero(l->v, l->n * sizeof *l->v);
  free(l->v);
  l->v = NULL;
  l->n = 0;
}

/* ---- one rollout's notifier ---- */

struct notifier {
  engine *e;
  notify_dest *dests;
  size_t n;
  outbox **boxes;          /* one per destination: each hears its messages in order */
  /* what the events told so far */
  char deployment[48];
  char version[129], from[129], strategy[64], kind[16];
  double started;
  int rolled_back;
  double pct;              /* the new version's share when the rollout went wrong */
  char reason[DC_ERR_MAX];
};

/* Slack reads &, < and > as markup (links, mentions): they are escaped.
 * A URL in a reason (a health check's) would become a link: it goes
 * without its scheme in a code span, which Slack shows as text. */
static char *slack_text(const char *s) {
  dc_buf b = {0};
  for (const char *p = s; *p; p++) {
    size_t scheme = strncmp(p, "http://", 7) == 0 ? 7 : strncmp(p, "https://", 8) == 0 ? 8 : 0;
    if (scheme) {
      const char *start = p + scheme, *end = start;
      while (*end && *end != ' ' && *end != '<' && *end != '>' && *end != '&' && *end != '`')
        end++;
      while (end > start && strchr(":;,.)", end[-1]))
        end--; /* the sentence's punctuation, not the URL's */
      dc_buf_puts(&b, "`");
      dc_buf_add(&b, start, (size_t)(end - start));
      dc_buf_puts(&b, "`");
      p = end - 1;
      continue;
    }
    if (*p == '&')
      dc_buf_puts(&b, "&amp;");
    else if (*p == '<')
      dc_buf_puts(&b, "&lt;");
    else if (*p == '>')
      dc_buf_puts(&b, "&gt;");
    else
      dc_buf_add(&b, p, 1);
  }
  return dc_buf_take(&b);
}

static void tell(notifier *n, const store_event *ev, const char *event, notify_severity sev, const char *summary) {
  char ts[40];
  dc_iso8601(ev->ts, ts, sizeof ts);
  for (size_t i = 0; i < n->n; i++) {
    const notify_dest *d = &n->dests[i];
    if (sev < d->severity)
      continue;
    json_t *body;
    if (d->format == NOTIFY_SLACK) {
      char *text = slack_text(summary);
      body = text ? json_pack("{s:o}", "text", dc_json_text(text)) : NULL;
      free(text);
    } else {
      body = json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:o, s:s}", "event", event, "severity",
                       severity_names[sev], "target", ev->target, "deployment", n->deployment, "version", n->version,
                       "from", n->from, "strategy", n->strategy, "kind", n->kind, "summary", dc_json_text(summary),
                       "time", ts);
      if (body && n->reason[0] && (strcmp(event, "rolled_back") == 0 || strcmp(event, "failed") == 0))
        json_object_set_new(body, "reason", dc_json_text(n->reason));
    }
    outbox_post(n->boxes[i], &d->to, NULL, body, "notification");
  }
}

static const char *str(json_t *data, const char *key) {
  const char *s = json_string_value(json_object_get(data, key));
  return s ? s : "";
}

static double num(json_t *data, const char *key) {
  json_t *v = json_object_get(data, key);
  return json_is_number(v) ? json_number_value(v) : 0;
}

static int is_rollback(const notifier *n) { return strcmp(n->kind, "rollback") == 0; }

void notifier_event(notifier *n, const store_event *ev) {
  char summary[2 * DC_ERR_MAX], why[DC_ERR_MAX];
  if (!n)
    return;
  json_t *data = ev->data ? dc_json_parse(ev->data, strlen(ev->data), why, sizeof why) : NULL;
  const char *t = ev->target;
  if (strcmp(ev->kind, "started") == 0) {
    dc_strlcpy(n->deployment, ev->deployment_id, sizeof n->deployment);
    dc_strlcpy(n->version, str(data, "version"), sizeof n->version);
    dc_strlcpy(n->from, str(data, "from"), sizeof n->from);
    dc_strlcpy(n->strategy, str(data, "strategy"), sizeof n->strategy);
    dc_strlcpy(n->kind, str(data, "kind"), sizeof n->kind);
    n->started = ev->ts;
    if (is_rollback(n))
      dc_fmt(summary, sizeof summary, "%s: rolling back to %s (from %s)", t, n->version, n->from[0] ? n->from : "nothing");
    else if (n->from[0])
      dc_fmt(summary, sizeof summary, "%s: deploying %s (from %s) with %s", t, n->version, n->from, n->strategy);
    else
      dc_fmt(summary, sizeof summary, "%s: deploying %s (first version) with %s", t, n->version, n->strategy);
    tell(n, ev, "started", NOTIFY_INFO, summary);
  } else if (strcmp(ev->kind, "paused") == 0) {
    dc_fmt(summary, sizeof summary, "%s: %s paused at %g %%: waiting for 'deployctl promote %s' or 'deployctl abort %s'",
           t, n->version, num(data, "pct"), t, t);
    tell(n, ev, "paused", NOTIFY_WARNING, summary);
  } else if (strcmp(ev->kind, "webhook_waiting") == 0) {
    dc_fmt(summary, sizeof summary, "%s: %s waits for webhook '%s' (%s) to answer 2xx: %s", t, n->version,
           str(data, "name"), str(data, "type"), str(data, "detail"));
    tell(n, ev, "paused", NOTIFY_WARNING, summary);
  } else if (strcmp(ev->kind, "aborted") == 0) {
    dc_strlcpy(n->reason, str(data, "reason"), sizeof n->reason);
    n->pct = num(data, "pct");
  } else if (strcmp(ev->kind, "rolled_back") == 0) {
    n->rolled_back = 1;
  } else if (strcmp(ev->kind, "promoted") == 0) {
    double took = ev->ts - n->started;
    if (is_rollback(n))
      dc_fmt(summary, sizeof summary, "%s: rolled back to %s (was %s) in %.1f s", t, n->version,
             n->from[0] ? n->from : "nothing", took);
    else
      dc_fmt(summary, sizeof summary, "%s: %s promoted (was %s) in %.1f s", t, n->version,
             n->from[0] ? n->from : "nothing", took);
    tell(n, ev, "promoted", is_rollback(n) ? NOTIFY_WARNING : NOTIFY_INFO, summary);
  } else if (strcmp(ev->kind, "finished") == 0 && !json_is_true(json_object_get(data, "success")) &&
             n->version[0]) {
    const char *reason = n->reason[0] ? n->reason : "failed";
    if (n->rolled_back)
      dc_fmt(summary, sizeof summary, "%s: %s rolled back at %g %%: %s; %s serves all traffic again", t, n->version,
             n->pct, reason, n->from);
    else if (n->from[0])
      dc_fmt(summary, sizeof summary, "%s: %s failed before traffic moved: %s; %s still serves", t, n->version, reason,
             n->from);
    else
      dc_fmt(summary, sizeof summary, "%s: %s failed: %s", t, n->version, reason);
    tell(n, ev, n->rolled_back ? "rolled_back" : "failed", NOTIFY_ERROR, summary);
  }
  json_decref(data);
}

notifier *notifier_new(engine *e, const notify_list *l) {
  if (!l || l->n == 0)
    return NULL;
  notifier *n = calloc(1, sizeof *n);
  if (!n)
    return NULL;
  n->e = e;
  n->dests = malloc(l->n * sizeof *n->dests);
  n->boxes = calloc(l->n, sizeof *n->boxes);
  if (n->dests && n->boxes) {
    memcpy(n->dests, l->v, l->n * sizeof *n->dests);
    n->n = l->n;
    for (size_t i = 0; i < n->n; i++) {
      if (!(n->boxes[i] = outbox_new(e))) {
        notifier_release(n);
        return NULL;
      }
    }
    return n;
  }
  free(n->dests);
  free(n->boxes);
  free(n);
  return NULL;
}

void notifier_release(notifier *n) {
  if (!n)
    return;
  for (size_t i = 0; i < n->n; i++)
    outbox_release(n->boxes[i]);
  if (n->dests)
    explicit_bzero(n->dests, n->n * sizeof *n->dests);
  free(n->dests);
  free(n->boxes);
  free(n);
}
