/* Push webhooks in: a git host says "this branch moved", and the
 * repositories of the config that match are synced at once instead of at
 * their next poll.
 *
 *   POST /hooks/github   X-Hub-Signature-256: sha256=HMAC(secret, body),
 *                        X-GitHub-Event: push (ping answered), X-GitHub-Delivery
 *   POST /hooks/gitlab   X-Gitlab-Token: secret, X-Gitlab-Event: Push Hook,
 *                        X-Gitlab-Event-UUID (or Idempotency-Key)
 *   POST /hooks/generic  X-Deploy-Signature: sha256=HMAC(secret, body),
 *                        X-Deploy-Delivery (optional); a JSON body, whose
 *                        "ref" (optional) names the branch
 *
 * The secret is the repository's `secret` in config.gitops; a request is
 * checked against every repository that has one (in constant time), and
 * syncs those it verifies for whose branch it is. Bodies are capped
 * before anything reads them (httpd answers 413). A delivery seen before
 * (its id, or the hash of its body when it has none) is refused with 409
 * and changes nothing: only after the signature is verified, so nobody
 * without the secret can fill the list of seen deliveries. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hmac.h"
#include "json.h"
#include "serve_int.h"
#include "util.h"

static const char *const kinds[HOOK_KINDS] = {"github", "gitlab", "generic"};

static int kind_of(const char *name) {
  for (int i = 0; i < HOOK_KINDS; i++)
    if (strcmp(kinds[i], name) == 0)
      return i;
  return HOOK_GENERIC;
}

/* A header's value as a C string ("" when absent or longer than size). */
static const char *header(serve *s, httpd_req *req, const char *name, char *buf, size_t size) {
  size_t len = 0;
  const char *v = s->api->header(req, name, &len);
  buf[0] = '\0';
  if (v && len < size)
    dc_fmt(buf, size, "%.*s", (int)len, v);
  return buf;
}

/* Does the request carry proof of this secret? */
static int verified(serve *s, httpd_req *req, const httpd_request *r, int kind, const char *secret) {
  char given[160], hex[DC_SHA256_HEX], want[DC_SHA256_HEX + 8];
  if (kind == HOOK_GITLAB)
    return header(s, req, "x-gitlab-token", given, sizeof given)[0] && dc_equal_secret(given, secret);
  header(s, req, kind == HOOK_GITHUB ? "x-hub-signature-256" : "x-deploy-signature", given, sizeof given);
  if (!given[0] || dc_hmac_sha256_hex(secret, strlen(secret), r->body, r->body_len, hex) != 0)
    return 0;
  dc_fmt(want, sizeof want, "sha256=%s", hex);
  /* Hex digits in either case. */
  for (char *p = given; *p; p++)
    if (*p >= 'A' && *p <= 'F')
      *p = (char)(*p - 'A' + 'a');
  return dc_equal_secret(given, want);
}

/* The delivery's identity for replays: the host's id, or the body's hash. */
static void delivery_of(serve *s, httpd_req *req, const httpd_request *r, int kind, char *out, size_t size) {
  static const char *const id_headers[HOOK_KINDS][2] = {
      {"x-github-delivery", NULL}, {"x-gitlab-event-uuid", "idempotency-key"}, {"x-deploy-delivery", NULL}};
  char id[96] = "";
  for (int i = 0; i < 2 && !id[0] && id_headers[kind][i]; i++)
    header(s, req, id_headers[kind][i], id, sizeof id);
  if (id[0]) {
    dc_fmt(out, size, "%s:%s", kinds[kind], id);
    return;
  }
  char hex[DC_SHA256_HEX];
  if (dc_hmac_sha256_hex("deployctl-delivery", 18, r->body, r->body_len, hex) != 0)
    hex[0] = '\0';
  dc_fmt(out, size, "%s:body:%s", kinds[kind], hex);
}

static int seen_before(serve *s, const char *delivery) {
  for (size_t i = 0; i < SERVE_DELIVERIES; i++)
    if (s->deliveries[i][0] && strcmp(s->deliveries[i], delivery) == 0)
      return 1;
  dc_strlcpy(s->deliveries[s->next_delivery % SERVE_DELIVERIES], delivery, sizeof s->deliveries[0]);
  s->next_delivery++;
  return 0;
}

static void answer(serve *s, httpd_req *req, int kind, int result, int status, json_t *doc) {
  s->hooks[kind][result]++;
  serve_reply_json(s, req, status, doc);
}

void serve_webhook(serve *s, httpd_req *req, const httpd_request *r, const char *name) {
  int kind = kind_of(name);
  char err[DC_ERR_MAX], event[64], delivery[128];
  size_t with_secret = 0;
  int match[64] = {0};
  size_t nmatch = 0;
  for (size_t i = 0; i < s->nrepos && i < 64; i++) {
    if (!s->repos[i].secret)
      continue;
    with_secret++;
    if (verified(s, req, r, kind, s->repos[i].secret)) {
      match[i] = 1;
      nmatch++;
    }
  }
  if (with_secret == 0) {
    answer(s, req, kind, HOOK_UNAUTHORIZED, 404,
           json_pack("{s:s}", "error", "serve: no gitops repository of the config has a webhook secret: add "
                                       "secret = \"${WEBHOOK_SECRET}\" to its entry in config.gitops"));
    return;
  }
  if (nmatch == 0) {
    static const char *const msg[HOOK_KINDS] = {
        "serve: X-Hub-Signature-256 is missing or does not match the body signed with a repository's secret",
        "serve: X-Gitlab-Token is missing or is not a repository's secret",
        "serve: X-Deploy-Signature (sha256=HMAC-SHA256 of the body, hex) is missing or does not match"};
    answer(s, req, kind, HOOK_UNAUTHORIZED, 401, json_pack("{s:s}", "error", msg[kind]));
    return;
  }
  delivery_of(s, req, r, kind, delivery, sizeof delivery);
  if (seen_before(s, delivery)) {
    answer(s, req, kind, HOOK_REPLAYED, 409,
           json_pack("{s:s, s:o}", "error", "serve: this delivery was received before: ignored", "delivery",
                     dc_json_text(delivery)));
    return;
  }
  if (kind == HOOK_GITHUB) {
    header(s, req, "x-github-event", event, sizeof event);
    if (strcmp(event, "ping") == 0) {
      answer(s, req, kind, HOOK_IGNORED, 200, json_pack("{s:s}", "pong", "deployctl"));
      return;
    }
  } else if (kind == HOOK_GITLAB) {
    header(s, req, "x-gitlab-event", event, sizeof event);
  } else {
    event[0] = '\0';
  }
  if ((kind == HOOK_GITHUB && strcmp(event, "push") != 0) || (kind == HOOK_GITLAB && strcmp(event, "Push Hook") != 0)) {
    answer(s, req, kind, HOOK_IGNORED, 200,
           json_pack("{s:o}", "ignored", dc_json_text(event[0] ? event : "no event header: only pushes sync")));
    return;
  }
  json_t *doc = r->body_len ? dc_json_parse(r->body, r->body_len, err, sizeof err) : json_object();
  if (!doc || !json_is_object(doc)) {
    answer(s, req, kind, HOOK_BAD, 400,
           json_pack("{s:o}", "error", dc_json_text(doc ? "serve: the body must be a JSON object" : err)));
    json_decref(doc);
    return;
  }
  json_t *ref_v = json_object_get(doc, "ref");
  if (ref_v && !json_is_string(ref_v)) {
    json_decref(doc);
    answer(s, req, kind, HOOK_BAD, 400, json_pack("{s:s}", "error", "serve: \"ref\" must be a string (refs/heads/BRANCH)"));
    return;
  }
  const char *ref = json_string_value(ref_v);
  if (!ref && kind != HOOK_GENERIC) {
    json_decref(doc);
    answer(s, req, kind, HOOK_BAD, 400, json_pack("{s:s}", "error", "serve: a push event without \"ref\""));
    return;
  }
  json_t *synced = json_array();
  for (size_t i = 0; i < s->nrepos && i < 64; i++) {
    if (!match[i])
      continue;
    char want[300];
    dc_fmt(want, sizeof want, "refs/heads/%s", s->repos[i].branch);
    if (ref && strcmp(ref, want) != 0 && strcmp(ref, s->repos[i].branch) != 0)
      continue;
    serve_repo_sync_now(s, i);
    json_array_append_new(synced, json_pack("{s:o, s:s}", "repo_url", dc_json_text(s->repos[i].url), "branch",
                                            s->repos[i].branch));
  }
  if (json_array_size(synced) == 0) {
    answer(s, req, kind, HOOK_IGNORED, 200,
           json_pack("{s:o, s:o}", "ignored", dc_json_text("a push to a branch no repository here follows"), "ref",
                     dc_json_text(ref)));
    json_decref(synced);
  } else {
    s->syncs_requested++;
    answer(s, req, kind, HOOK_ACCEPTED, 202, json_pack("{s:o}", "syncing", synced));
  }
  json_decref(doc);
}
