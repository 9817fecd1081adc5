/* serve's GitOps: each repository of config.gitops is watched as
 * `deployctl watch` watches one (gitsync_watch_round every interval,
 * backing off after failures), and a verified push webhook runs a round
 * at once: now when none is in flight, else right after the one that is.
 * What each round did is kept for the API and said on stdout. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "serve_int.h"
#include "util.h"

static void round_start(serve_repo_state *r);

static void on_timer(uv_timer_t *t) { round_start(t->data); }

static void schedule(serve_repo_state *r, double seconds) {
  if (r->s->stopping || !r->timer_open)
    return;
  uint64_t ms = seconds <= 0 ? 0 : (uint64_t)(seconds * 1000);
  uv_timer_start(&r->timer, on_timer, ms, 0);
}

static void round_done(void *payload, const gitsync_report *rep) {
  serve_repo_state *r = payload;
  serve *s = r->s;
  r->running = 0;
  r->rounds++;
  if (!rep->success)
    r->failed++;
  json_t *errors = json_array();
  for (size_t i = 0; i < rep->nerrors; i++)
    json_array_append_new(errors, dc_json_text(rep->errors[i]));
  char at[40];
  dc_iso8601(engine_now(s->e), at, sizeof at);
  json_decref(r->last);
  r->last = json_pack("{s:s, s:b, s:o, s:i, s:i, s:o, s:b}", "at", at, "success", rep->success, "revision",
                      rep->revision && *rep->revision ? json_string(rep->revision) : json_null(), "changes",
                      (int)rep->nchanges, "applied", (int)rep->napplied, "errors", errors, "fetch_failed",
                      rep->fetch_failed);
  if (rep->report) {
    fprintf(stdout, "serve: gitops %s %s: %s at %.12s (%zu applied)\n", r->url, r->branch,
            rep->success ? "in sync" : "FAILED", rep->revision && *rep->revision ? rep->revision : "-",
            rep->napplied);
    for (size_t i = 0; i < rep->nerrors; i++)
      fprintf(stdout, "serve: gitops %s: %s\n", r->url, rep->errors[i]);
    fflush(stdout);
  }
  serve_release(s);
  if (s->stopping)
    return;
  if (r->again) {
    r->again = 0;
    schedule(r, 0);
  } else {
    schedule(r, gitsync_next_delay(r->gs));
  }
}

static void round_start(serve_repo_state *r) {
  char err[DC_ERR_MAX];
  if (r->running || r->s->stopping)
    return;
  r->running = 1;
  serve_hold(r->s);
  if (gitsync_watch_round(r->gs, round_done, r, err) != DC_OK) {
    gitsync_report rep = {.success = 0, .errors = (const char *const[]){err}, .nerrors = 1, .report = 1};
    round_done(r, &rep);
  }
}

void serve_repo_sync_now(serve *s, size_t i) {
  serve_repo_state *r = &s->repos[i];
  if (r->running)
    r->again = 1;
  else
    schedule(r, 0);
}

static void repo_timer_closed(uv_handle_t *h) {
  serve_repo_state *r = h->data;
  serve *s = r->s;
  s->timers_open--;
  serve_release(s);
}

int serve_repos_start(serve *s, const serve_repo *repos, size_t n, char *err) {
  s->repos = calloc(n + 1, sizeof *s->repos);
  if (!s->repos) {
    dc_fmt(err, DC_ERR_MAX, "serve: out of memory");
    return -1;
  }
  for (size_t i = 0; i < n; i++) {
    serve_repo_state *r = &s->repos[i];
    const gitops *g = gitsync_gitops(repos[i].gs);
    r->s = s;
    r->i = i;
    r->gs = repos[i].gs;
    r->secret = repos[i].secret && *repos[i].secret ? strdup(repos[i].secret) : NULL;
    dc_strlcpy(r->url, gitops_url(g), sizeof r->url);
    dc_strlcpy(r->branch, gitops_branch(g), sizeof r->branch);
    dc_strlcpy(r->path, gitops_path(g), sizeof r->path);
    uv_timer_init(s->e->loop, &r->timer);
    r->timer.data = r;
    r->timer_open = 1;
    s->timers_open++;
    s->nrepos = i + 1;
    uv_timer_start(&r->timer, on_timer, 0, 0);
  }
  return 0;
}

void serve_repos_stop(serve *s) {
  for (size_t i = 0; i < s->nrepos; i++) {
    serve_repo_state *r = &s->repos[i];
    if (!r->timer_open)
      continue;
    r->timer_open = 0;
    uv_timer_stop(&r->timer);
    /* Held until the close callback: the state must outlive it. */
    serve_hold(s);
    uv_close((uv_handle_t *)&r->timer, repo_timer_closed);
    if (r->running)
      gitsync_cancel(r->gs);
  }
}

void serve_repos_free(serve *s) {
  for (size_t i = 0; s->repos && i < s->nrepos; i++) {
    serve_repo_state *r = &s->repos[i];
    if (r->secret)
      explicit_bzero(r->secret, strlen(r->secret));
    free(r->secret);
    json_decref(r->last);
  }
  free(s->repos);
  s->repos = NULL;
}

json_t *serve_repos_json(serve *s) {
  json_t *list = json_array();
  for (size_t i = 0; i < s->nrepos; i++) {
    serve_repo_state *r = &s->repos[i];
    const char *rev = gitsync_revision(r->gs);
    json_array_append_new(list, json_pack("{s:o, s:s, s:s, s:o, s:b, s:b, s:i, s:o}", "repo_url", dc_json_text(r->url),
                                          "branch", r->branch, "path", r->path, "revision",
                                          rev && *rev ? json_string(rev) : json_null(), "syncing", r->running,
                                          "webhook", r->secret != NULL, "rounds", (int)r->rounds, "last_round",
                                          r->last ? json_incref(r->last) : json_null()));
  }
  return list;
}
