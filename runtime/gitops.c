/* The git module (deploy-git.so): fetching with libgit2 into a bare
 * cache, reading manifests straight from git objects. Loaded on first use
 * (runtime/module.c), so that commands which never touch git never load
 * libgit2 and the libraries it pulls in; the core reaches it through
 * deploy_git_api only. */
#include "gitops.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <git2.h>

#include "util.h"

#define URL_MAX 2048

struct gitops {
  engine *e;
  git_repository *repo;
  char url[URL_MAX];       /* what libgit2 gets: no password, no http user */
  char given[URL_MAX];     /* as the caller wrote it (may hold a token) */
  char redacted[URL_MAX];
  char url_user[256];      /* user-info of the URL, percent-decoded */
  char url_secret[512];    /* its password, percent-decoded */
  char url_secret_raw[512];/* and as written in the URL */
  int http;                /* http(s): the user-info may itself be a token */
  char branch[256];
  char path[1024];         /* "" for the root */
  char cache[1024];
  char remote_ref[300];    /* refs/heads/<branch> */
  char local_ref[320];     /* refs/remotes/origin/<branch> */

  /* Read on the loop before each fetch; the worker only reads them. */
  char env_user[256];
  char env_token[512];
  char ssh_key[1024];
  int cred_calls;
  char cred_err[DC_ERR_MAX];

  /* What the last delivered update read: the base of the next tree diff. */
  int have_snap;
  git_oid snap_commit;
  git_oid snap_tree;

  /* The fetch in flight: the repository belongs to the worker meanwhile. */
  uv_work_t work;
  int busy;
  int orphaned;            /* freed by the owner while busy: free when done */
  volatile int cancel;
  gitops_fetch_cb cb;
  void *payload;
  gitops_update upd;
  char work_err[DC_ERR_MAX];
  gitops_stats stats;
};

static void gm_update_clear(gitops_update *u);

/* ---- libgit2, once per process ---- */

static pthread_once_t git_once = PTHREAD_ONCE_INIT;
static int git_init_rc;

/* GIT_SSL_CAINFO / GIT_SSL_CAPATH mean what they mean to git: trust these
 * certificates (a private CA, a self-signed test server) instead of the
 * system's. */
static void init_libgit2(void) {
  /* The module stays loaded for good (RTLD_NODELETE, see module.c): a
   * fetch may still run on a pool thread when its owner goes away. */
  git_init_rc = git_libgit2_init();
  const char *file = getenv("GIT_SSL_CAINFO");
  const char *dir = getenv("GIT_SSL_CAPATH");
  if (git_init_rc >= 0 && ((file && *file) || (dir && *dir)))
    git_libgit2_opts(GIT_OPT_SET_SSL_CERT_LOCATIONS, file && *file ? file : NULL, dir && *dir ? dir : NULL);
}

/* libgit2's message for the last failure on this thread. Only called after
 * a call returned < 0: git_error_last() alone may be stale. */
static const char *git_msg(void) {
  const git_error *e = git_error_last();
  return e && e->message ? e->message : "unknown libgit2 error";
}

/* ---- URLs and redaction ---- */

static int hexval(char c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  return -1;
}

static void percent_decode(char *dst, size_t size, const char *src, size_t len) {
  size_t o = 0;
  for (size_t i = 0; i < len && o + 1 < size; i++) {
    if (src[i] == '%' && i + 2 < len && hexval(src[i + 1]) >= 0 && hexval(src[i + 2]) >= 0) {
      dst[o++] = (char)(hexval(src[i + 1]) * 16 + hexval(src[i + 2]));
      i += 2;
    } else {
      dst[o++] = src[i];
    }
  }
  dst[o] = '\0';
}

/* The parts of scheme://userinfo@rest that matter here. */
typedef struct url_parts {
  size_t scheme_len;    /* 0: no "://" (a path or scp-style user@host:path) */
  const char *info;     /* user-info, or NULL */
  size_t info_len;
  const char *colon;    /* ':' inside the user-info, or NULL */
  const char *rest;     /* the host and what follows */
} url_parts;

static void url_split(const char *url, url_parts *p) {
  memset(p, 0, sizeof *p);
  p->rest = url;
  const char *sep = strstr(url, "://");
  if (!sep)
    return;
  p->scheme_len = (size_t)(sep - url);
  const char *auth = sep + 3;
  size_t auth_len = strcspn(auth, "/?#");
  const char *at = NULL;
  for (size_t i = 0; i < auth_len; i++)
    if (auth[i] == '@')
      at = auth + i; /* the last '@': a password may hold one unencoded */
  p->rest = auth;
  if (!at)
    return;
  p->info = auth;
  p->info_len = (size_t)(at - auth);
  p->colon = memchr(auth, ':', p->info_len);
  p->rest = at + 1;
}

static int scheme_is_http(const char *url, size_t len) {
  return (len == 4 && strncmp(url, "http", 4) == 0) || (len == 5 && strncmp(url, "https", 5) == 0);
}

static void gm_redact_url(char *dst, size_t size, const char *url) {
  url_parts p;
  url_split(url, &p);
  if (!p.info) {
    dc_strlcpy(dst, url, size);
    return;
  }
  size_t head = p.scheme_len + 3;
  if (p.colon) {
    /* user:secret@ -> user:***@ */
    dc_fmt(dst, size, "%.*s%.*s:***@%s", (int)head, url, (int)(p.colon - p.info), p.info, p.rest);
  } else if (scheme_is_http(url, p.scheme_len)) {
    /* https://TOKEN@host is how some forges take a token: hide it all. */
    dc_fmt(dst, size, "%.*s***@%s", (int)head, url, p.rest);
  } else {
    dc_strlcpy(dst, url, size); /* ssh://git@host: a user name, no secret */
  }
}

/* Fills url (for libgit2), redacted, url_user and url_secret. */
static void parse_url(gitops *g, const char *url) {
  url_parts p;
  url_split(url, &p);
  dc_strlcpy(g->given, url, sizeof g->given);
  gm_redact_url(g->redacted, sizeof g->redacted, url);
  g->http = scheme_is_http(url, p.scheme_len);
  if (!p.info) {
    dc_strlcpy(g->url, url, sizeof g->url);
    return;
  }
  size_t user_len = p.colon ? (size_t)(p.colon - p.info) : p.info_len;
  percent_decode(g->url_user, sizeof g->url_user, p.info, user_len);
  if (p.colon) {
    size_t n = p.info_len - user_len - 1;
    percent_decode(g->url_secret, sizeof g->url_secret, p.colon + 1, n);
    dc_fmt(g->url_secret_raw, sizeof g->url_secret_raw, "%.*s", (int)n, p.colon + 1);
  }
  size_t head = p.scheme_len + 3;
  if (g->http) /* the credentials callback supplies user and token */
    dc_fmt(g->url, sizeof g->url, "%.*s%s", (int)head, url, p.rest);
  else
    dc_fmt(g->url, sizeof g->url, "%.*s%.*s@%s", (int)head, url, (int)user_len, p.info, p.rest);
}

/* Replaces each occurrence of needle in text by "***", in place. */
static void replace_all(char *text, size_t size, const char *needle) {
  size_t nlen = strlen(needle);
  if (nlen == 0)
    return;
  char *hit = strstr(text, needle);
  while (hit) {
    size_t tail = strlen(hit + nlen);
    size_t pos = (size_t)(hit - text);
    if (pos + 3 + tail >= size)
      tail = size - pos - 4;
    memmove(hit + 3, hit + nlen, tail);
    hit[3 + tail] = '\0';
    memcpy(hit, "***", 3);
    hit = strstr(hit + 3, needle);
  }
}

static void gm_redact(const gitops *g, char *text, size_t size) {
  if (!g || !text || size < 4)
    return;
  /* The whole URL first, so that what remains is its redacted form. */
  if (strcmp(g->given, g->redacted) != 0) {
    char *hit = strstr(text, g->given);
    while (hit) {
      char tail[DC_ERR_MAX * 2];
      dc_strlcpy(tail, hit + strlen(g->given), sizeof tail);
      dc_fmt(hit, size - (size_t)(hit - text), "%s%s", g->redacted, tail);
      hit = strstr(hit + strlen(g->redacted), g->given);
    }
  }
  replace_all(text, size, g->url_secret_raw);
  replace_all(text, size, g->url_secret);
  if (g->http && !g->url_secret[0]) /* https://TOKEN@host */
    replace_all(text, size, g->url_user);
  replace_all(text, size, g->env_token);
}

/* ---- options ---- */

/* "/deploy//prod/" -> "deploy/prod"; "." and ".." parts are refused:
 * manifests come from under `path` and nowhere else. */
static int normalise_path(char *dst, size_t size, const char *path, char *err) {
  size_t o = 0;
  const char *p = path;
  dst[0] = '\0';
  while (*p) {
    while (*p == '/')
      p++;
    size_t n = strcspn(p, "/");
    if (n == 0)
      break;
    if ((n == 1 && p[0] == '.') || (n == 2 && p[0] == '.' && p[1] == '.') || memchr(p, '\\', n)) {
      dc_fmt(err, DC_ERR_MAX,
             "deploy: GitOpsSynchronizer: path '%s' leaves the repository's tree ('.', '..' or '\\' in it): "
             "give a directory of the repository, such as \"/\" or \"deploy/production\"",
             path);
      return -1;
    }
    if (o + n + 2 > size) {
      dc_fmt(err, DC_ERR_MAX, "deploy: GitOpsSynchronizer: path is longer than %zu bytes", size - 1);
      return -1;
    }
    if (o)
      dst[o++] = '/';
    memcpy(dst + o, p, n);
    o += n;
    dst[o] = '\0';
    p += n;
  }
  return 0;
}

static int check_branch(gitops *g, const char *branch, char *err) {
  int valid = 0;
  dc_fmt(g->remote_ref, sizeof g->remote_ref, "refs/heads/%s", branch);
  if (!*branch || strlen(branch) >= sizeof g->branch || git_reference_name_is_valid(&valid, g->remote_ref) < 0 ||
      !valid) {
    dc_fmt(err, DC_ERR_MAX, "deploy: GitOpsSynchronizer: branch '%.200s' is not a valid branch name: give a name "
                            "such as \"main\" (no spaces, no '..', no ':')", branch);
    return -1;
  }
  dc_strlcpy(g->branch, branch, sizeof g->branch);
  dc_fmt(g->local_ref, sizeof g->local_ref, "refs/remotes/origin/%s", branch);
  return 0;
}

/* <cache_dir>/<16 hex digits of the SHA-1 of the redacted URL>: the same
 * repository with another token shares its cache. */
static void cache_path(gitops *g, const char *cache_dir) {
  git_oid oid;
  char hex[GIT_OID_HEXSZ + 1];
  git_odb_hash(&oid, g->redacted, strlen(g->redacted), GIT_OBJECT_BLOB);
  git_oid_tostr(hex, sizeof hex, &oid);
  hex[16] = '\0';
  dc_fmt(g->cache, sizeof g->cache, "%s/%s", cache_dir, hex);
}

static int open_cache(gitops *g, char *err) {
  if (git_repository_open_bare(&g->repo, g->cache) == 0)
    return 0;
  git_repository_init_options io;
  git_repository_init_options_init(&io, GIT_REPOSITORY_INIT_OPTIONS_VERSION);
  io.flags = GIT_REPOSITORY_INIT_BARE | GIT_REPOSITORY_INIT_MKPATH;
  if (git_repository_init_ext(&g->repo, g->cache, &io) == 0)
    return 0;
  dc_fmt(err, DC_ERR_MAX, "deploy: GitOpsSynchronizer: cannot create the cache repository %s: %s: check that the "
                          "directory is writable, or remove it if it is damaged", g->cache, git_msg());
  gm_redact(g, err, DC_ERR_MAX);
  return -1;
}

static int gm_open(gitops **out, engine *e, const gitops_opts *o, char *err) {
  *out = NULL;
  pthread_once(&git_once, init_libgit2);
  if (git_init_rc < 0) {
    dc_fmt(err, DC_ERR_MAX, "deploy: cannot initialise libgit2");
    return -1;
  }
  if (!o->url || !*o->url) {
    dc_fmt(err, DC_ERR_MAX, "deploy: GitOpsSynchronizer needs repo_url = \"https://host/repo.git\" (or git://, "
                            "ssh://, file://)");
    return -1;
  }
  gitops *g = calloc(1, sizeof *g);
  if (!g) {
    dc_fmt(err, DC_ERR_MAX, "deploy: out of memory");
    return -1;
  }
  g->e = e;
  parse_url(g, o->url);
  if (strlen(o->url) >= URL_MAX - 8 || check_branch(g, o->branch ? o->branch : "main", err) != 0 ||
      normalise_path(g->path, sizeof g->path, o->path ? o->path : "/", err) != 0) {
    if (strlen(o->url) >= URL_MAX - 8)
      dc_fmt(err, DC_ERR_MAX, "deploy: GitOpsSynchronizer: repo_url is longer than %d bytes", URL_MAX - 8);
    free(g);
    return -1;
  }
  cache_path(g, o->cache_dir && *o->cache_dir ? o->cache_dir : ".deploy/git");
  if (open_cache(g, err) != 0) {
    free(g);
    return -1;
  }
  *out = g;
  return 0;
}

static void destroy(gitops *g) {
  git_repository_free(g->repo);
  gm_update_clear(&g->upd);
  free(g);
}

static void gm_free(gitops *g) {
  if (!g)
    return;
  if (g->busy) {
    g->orphaned = 1;
    g->cancel = 1;
    return;
  }
  destroy(g);
}

static const char *gm_url(const gitops *g) { return g->redacted; }
static const char *gm_branch(const gitops *g) { return g->branch; }
static const char *gm_path(const gitops *g) { return g->path; }
static const char *gm_cache(const gitops *g) { return g->cache; }
static const gitops_stats *gm_last_stats(const gitops *g) { return &g->stats; }
static int gm_busy(const gitops *g) { return g->busy; }
static void gm_cancel(gitops *g) { g->cancel = 1; }

static void gm_update_clear(gitops_update *u) {
  if (!u)
    return;
  for (size_t i = 0; i < u->n; i++) {
    free(u->entries[i].file);
    free(u->entries[i].data);
  }
  free(u->entries);
  memset(u, 0, sizeof *u);
}

/* ---- the worker: credentials ---- */

static int file_exists(const char *path) {
  struct stat st;
  return stat(path, &st) == 0;
}

static int ssh_key_credential(gitops *g, git_credential **out, const char *user) {
  char pub[1100];
  dc_fmt(pub, sizeof pub, "%s.pub", g->ssh_key);
  if (!file_exists(g->ssh_key)) {
    dc_fmt(g->cred_err, sizeof g->cred_err, "cannot reach %s: DEPLOY_GIT_SSH_KEY names %s, which does not exist: "
                                            "give the path of a private key the server accepts", g->redacted, g->ssh_key);
    return GIT_EUSER;
  }
  return git_credential_ssh_key_new(out, user, file_exists(pub) ? pub : NULL, g->ssh_key, NULL);
}

static int userpass_credential(gitops *g, git_credential **out) {
  const char *user = g->url_user[0] ? g->url_user : g->env_user;
  const char *token = g->url_secret[0] ? g->url_secret : g->env_token;
  if (!user[0] && !token[0]) {
    dc_fmt(g->cred_err, sizeof g->cred_err, "cannot reach %s: it asks for credentials: set "
                                            "DEPLOY_GIT_USERNAME and DEPLOY_GIT_TOKEN", g->redacted);
    return GIT_EUSER;
  }
  /* Forges that take a token as the user name want any password. */
  return git_credential_userpass_plaintext_new(out, user[0] ? user : "x-access-token", token);
}

/* libgit2 calls again after a refusal; a second call means the credentials
 * were wrong, and asking again would loop. */
static int credentials_cb(git_credential **out, const char *url, const char *user_from_url, unsigned int allowed,
                          void *payload) {
  gitops *g = payload;
  (void)url;
  const char *user = user_from_url && *user_from_url ? user_from_url : (g->env_user[0] ? g->env_user : "git");
  if (allowed & GIT_CREDENTIAL_USERNAME)
    return git_credential_username_new(out, user);
  if (++g->cred_calls > 1) {
    dc_fmt(g->cred_err, sizeof g->cred_err, "cannot reach %s: it refused the credentials: check %s", g->redacted,
           (allowed & GIT_CREDENTIAL_SSH_KEY) ? "DEPLOY_GIT_SSH_KEY (and that its public key is authorised)"
                                              : "DEPLOY_GIT_USERNAME and DEPLOY_GIT_TOKEN (or the URL's user:token)");
    return GIT_EUSER;
  }
  if ((allowed & GIT_CREDENTIAL_SSH_KEY) && g->ssh_key[0])
    return ssh_key_credential(g, out, user);
  if (allowed & GIT_CREDENTIAL_USERPASS_PLAINTEXT)
    return userpass_credential(g, out);
  dc_fmt(g->cred_err, sizeof g->cred_err, "cannot reach %s: it asks for an ssh key: set DEPLOY_GIT_SSH_KEY to the "
                                          "path of a private key", g->redacted);
  return GIT_EUSER;
}

/* libgit2 has already checked the host key against ~/.ssh/known_hosts, or
 * the TLS certificate against the trusted CAs: `valid` says how it went.
 * An untrusted server is refused, with the fix in the message. */
static int certificate_cb(git_cert *cert, int valid, const char *host, void *payload) {
  gitops *g = payload;
  if (valid)
    return 0;
  if (cert->cert_type == GIT_CERT_HOSTKEY_LIBSSH2)
    dc_fmt(g->cred_err, sizeof g->cred_err, "cannot reach %s: the ssh host key of %s is not in ~/.ssh/known_hosts: "
                                            "add it (ssh-keyscan -p PORT %s >> ~/.ssh/known_hosts)",
           g->redacted, host, host);
  else
    dc_fmt(g->cred_err, sizeof g->cred_err, "cannot reach %s: the TLS certificate of %s is not trusted: set "
                                            "GIT_SSL_CAINFO to the certificate of the CA that signed it",
           g->redacted, host);
  return GIT_ECERTIFICATE;
}

static int progress_cb(const git_indexer_progress *stats, void *payload) {
  (void)stats;
  return ((gitops *)payload)->cancel ? -1 : 0;
}

static int sideband_cb(const char *str, int len, void *payload) {
  (void)str;
  (void)len;
  return ((gitops *)payload)->cancel ? -1 : 0;
}

/* ---- the worker: fetch ---- */

static void work_fail(gitops *g, const char *what, const char *detail, const char *fix) {
  if (g->cred_err[0]) /* our own diagnosis says more than libgit2's */
    dc_fmt(g->work_err, sizeof g->work_err, "deploy: gitops: %s (branch %s)", g->cred_err, g->branch);
  else
    dc_fmt(g->work_err, sizeof g->work_err, "deploy: gitops: %s %s (branch %s): %s: %s", what, g->redacted,
           g->branch, detail, fix);
  gm_redact(g, g->work_err, sizeof g->work_err);
}

static void list_branches(const git_remote_head **heads, size_t n, char *buf, size_t size) {
  size_t len = 0;
  buf[0] = '\0';
  for (size_t i = 0; i < n && len + 80 < size; i++) {
    if (strncmp(heads[i]->name, "refs/heads/", 11) != 0)
      continue;
    len += (size_t)snprintf(buf + len, size - len, "%s%s", len ? ", " : "", heads[i]->name + 11);
  }
  if (!len)
    dc_strlcpy(buf, "none: the repository is empty", size);
}

/* The advertised tip of the branch; -1 with work_err when it is missing. */
static int find_branch(gitops *g, git_remote *remote, git_oid *tip) {
  const git_remote_head **heads;
  size_t n;
  if (git_remote_ls(&heads, &n, remote) < 0) {
    work_fail(g, "cannot list the branches of", git_msg(), "check the URL");
    return -1;
  }
  for (size_t i = 0; i < n; i++) {
    if (strcmp(heads[i]->name, g->remote_ref) == 0) {
      git_oid_cpy(tip, &heads[i]->oid);
      return 0;
    }
  }
  char known[400], detail[600];
  list_branches(heads, n, known, sizeof known);
  dc_fmt(detail, sizeof detail, "no branch '%s' (branches: %s)", g->branch, known);
  work_fail(g, "branch not found in", detail, "set branch to an existing one, or push it");
  return -1;
}

/* True when the cache already holds the advertised tip: no download. */
static int up_to_date(gitops *g, const git_oid *tip) {
  git_oid have;
  git_odb *odb = NULL;
  if (git_reference_name_to_id(&have, g->repo, g->local_ref) != 0 || !git_oid_equal(&have, tip))
    return 0;
  int ok = git_repository_odb(&odb, g->repo) == 0 && git_odb_exists(odb, tip);
  git_odb_free(odb);
  return ok;
}

static int download(gitops *g, git_remote *remote, const git_remote_callbacks *cbs, const git_oid *tip) {
  char spec[700];
  char *specs[] = {spec};
  git_strarray refspecs = {specs, 1};
  git_fetch_options fo;
  git_reference *ref = NULL;
  git_fetch_options_init(&fo, GIT_FETCH_OPTIONS_VERSION);
  dc_fmt(spec, sizeof spec, "+%s:%s", g->remote_ref, g->local_ref);
  fo.callbacks = *cbs;
  fo.download_tags = GIT_REMOTE_DOWNLOAD_TAGS_NONE;
  fo.update_fetchhead = 0;
  if (git_remote_download(remote, &refspecs, &fo) < 0) {
    work_fail(g, "cannot fetch from", git_msg(), "check the URL, the network and the credentials");
    return -1;
  }
  /* Set from the advertisement we checked, not from whatever update_tips
   * would infer for an anonymous remote. */
  if (git_reference_create(&ref, g->repo, g->local_ref, tip, 1, "deployctl: fetch") < 0) {
    work_fail(g, "cannot record the fetched tip of", git_msg(), "check that the cache is writable");
    return -1;
  }
  git_reference_free(ref);
  g->stats.downloaded = 1;
  return 0;
}

static int fetch_branch(gitops *g, git_oid *tip) {
  git_remote *remote = NULL;
  git_remote_callbacks cbs;
  git_remote_init_callbacks(&cbs, GIT_REMOTE_CALLBACKS_VERSION);
  cbs.credentials = credentials_cb;
  cbs.certificate_check = certificate_cb;
  cbs.transfer_progress = progress_cb;
  cbs.sideband_progress = sideband_cb;
  cbs.payload = g;
  int rc = -1;
  if (git_remote_create_anonymous(&remote, g->repo, g->url) < 0) {
    work_fail(g, "cannot use the URL", git_msg(), "give an https://, git://, ssh:// or file:// URL");
    return -1;
  }
  if (git_remote_connect(remote, GIT_DIRECTION_FETCH, &cbs, NULL, NULL) < 0)
    work_fail(g, "cannot reach", git_msg(), "check the URL, that the server is up, and the credentials");
  else if (find_branch(g, remote, tip) == 0)
    rc = up_to_date(g, tip) ? 0 : download(g, remote, &cbs, tip);
  git_remote_disconnect(remote);
  git_remote_free(remote);
  return rc;
}

/* ---- the worker: reading manifests ---- */

static int ends_with_json(const char *name) {
  size_t n = strlen(name);
  return n > 5 && strcmp(name + n - 5, ".json") == 0;
}

static gitops_entry *push_entry(gitops *g, const char *name, gitops_status status) {
  gitops_update *u = &g->upd;
  gitops_entry *grown = realloc(u->entries, (u->n + 1) * sizeof *grown);
  if (!grown)
    return NULL;
  u->entries = grown;
  gitops_entry *en = &u->entries[u->n++];
  memset(en, 0, sizeof *en);
  size_t len = strlen(g->path) + strlen(name) + 2;
  en->file = malloc(len);
  if (en->file)
    dc_fmt(en->file, len, "%s%s%s", g->path, g->path[0] ? "/" : "", name);
  en->status = status;
  return en;
}

/* Size from the object header first: a huge blob is refused unread. */
static int read_blob(gitops *g, gitops_entry *en, const git_oid *oid) {
  git_odb *odb = NULL;
  git_object_t type;
  size_t size = 0;
  if (git_repository_odb(&odb, g->repo) < 0 || git_odb_read_header(&size, &type, odb, oid) < 0) {
    git_odb_free(odb);
    work_fail(g, "cannot read a manifest of", git_msg(), "the cache may be damaged: remove it to fetch again");
    return -1;
  }
  git_odb_free(odb);
  en->size = size;
  if (size > GITOPS_MAX_MANIFEST) {
    en->problem = GITOPS_TOO_LARGE;
    return 0;
  }
  git_blob *blob = NULL;
  if (git_blob_lookup(&blob, g->repo, oid) < 0) {
    work_fail(g, "cannot read a manifest of", git_msg(), "the cache may be damaged: remove it to fetch again");
    return -1;
  }
  en->data = malloc(size + 1);
  if (en->data) {
    memcpy(en->data, git_blob_rawcontent(blob), size);
    en->data[size] = '\0';
  }
  git_blob_free(blob);
  g->stats.blobs_read++;
  return 0;
}

/* One entry directly under path that changed (or exists, on a full read). */
static int add_entry(gitops *g, const char *name, git_filemode_t mode, const git_oid *oid, gitops_status status) {
  if (!ends_with_json(name) || mode == GIT_FILEMODE_TREE)
    return 0;
  gitops_entry *en = push_entry(g, name, status);
  if (!en || !en->file) {
    work_fail(g, "cannot read the manifests of", "out of memory", "free some memory");
    return -1;
  }
  git_oid_tostr(en->oid, sizeof en->oid, oid);
  if (status == GITOPS_DELETED)
    return 0;
  if (strchr(name, '/') || strchr(name, '\\'))
    en->problem = GITOPS_BAD_NAME;
  else if (mode == GIT_FILEMODE_LINK)
    en->problem = GITOPS_SYMLINK;
  else if (mode != GIT_FILEMODE_BLOB && mode != GIT_FILEMODE_BLOB_EXECUTABLE)
    en->problem = GITOPS_NOT_FILE;
  else
    return read_blob(g, en, oid);
  return 0;
}

static int read_full(gitops *g, const git_tree *sub) {
  size_t n = git_tree_entrycount(sub);
  g->upd.full = 1;
  for (size_t i = 0; i < n; i++) {
    const git_tree_entry *te = git_tree_entry_byindex(sub, i);
    if (add_entry(g, git_tree_entry_name(te), git_tree_entry_filemode(te), git_tree_entry_id(te), GITOPS_ADDED) != 0)
      return -1;
  }
  return 0;
}

/* A delta's path holds '/' either because it is inside a subdirectory
 * (not a manifest: skipped) or because the tree entry's own name holds one,
 * which no honest tree has: that one is refused. */
static int diff_delta(gitops *g, const git_tree *sub, const git_diff_delta *d) {
  int deleted = d->status == GIT_DELTA_DELETED;
  const git_diff_file *f = deleted ? &d->old_file : &d->new_file;
  if (strchr(f->path, '/') && (deleted || !git_tree_entry_byname(sub, f->path)))
    return 0;
  gitops_status st = deleted ? GITOPS_DELETED : d->status == GIT_DELTA_ADDED ? GITOPS_ADDED : GITOPS_MODIFIED;
  return add_entry(g, f->path, (git_filemode_t)f->mode, &f->id, st);
}

static int read_diff(gitops *g, const git_tree *old_sub, const git_tree *sub) {
  git_diff *diff = NULL;
  git_diff_options o;
  git_diff_options_init(&o, GIT_DIFF_OPTIONS_VERSION);
  /* Only names and blob ids are wanted: never load contents to guess
   * whether they are binary. */
  o.flags = GIT_DIFF_SKIP_BINARY_CHECK | GIT_DIFF_INCLUDE_TYPECHANGE;
  if (git_diff_tree_to_tree(&diff, g->repo, (git_tree *)old_sub, (git_tree *)sub, &o) < 0) {
    work_fail(g, "cannot compare revisions of", git_msg(), "the cache may be damaged: remove it to fetch again");
    return -1;
  }
  g->stats.tree_diffed = 1;
  int rc = 0;
  size_t n = git_diff_num_deltas(diff);
  for (size_t i = 0; i < n && rc == 0; i++)
    rc = diff_delta(g, sub, git_diff_get_delta(diff, i));
  git_diff_free(diff);
  return rc;
}

/* The tree at path in commit `id`; *sub NULL (and 0) when path is absent
 * and missing_ok, else -1 with work_err. */
static int tree_at_path(gitops *g, const git_oid *id, git_tree **sub, int missing_ok) {
  git_commit *c = NULL;
  git_tree *root = NULL;
  git_tree_entry *te = NULL;
  char rev[GIT_OID_HEXSZ + 1], detail[1400];
  int rc = -1;
  *sub = NULL;
  git_oid_tostr(rev, sizeof rev, id);
  if (git_commit_lookup(&c, g->repo, id) < 0 || git_commit_tree(&root, c) < 0) {
    work_fail(g, "cannot read the tip of", git_msg(), "the cache may be damaged: remove it to fetch again");
  } else if (!g->path[0]) {
    rc = git_tree_dup(sub, root);
  } else if (git_tree_entry_bypath(&te, root, g->path) < 0) {
    rc = missing_ok ? 0 : -1;
    dc_fmt(detail, sizeof detail, "path '%s' does not exist in revision %.12s", g->path, rev);
    if (!missing_ok)
      work_fail(g, "no manifests in", detail, "create the directory or fix path");
  } else if (git_tree_entry_filemode(te) == GIT_FILEMODE_LINK) {
    dc_fmt(detail, sizeof detail, "path '%s' is a symbolic link in revision %.12s: refused, it could point "
                                  "outside the repository", g->path, rev);
    work_fail(g, "no manifests in", detail, "make it a real directory");
  } else if (git_tree_entry_type(te) != GIT_OBJECT_TREE) {
    dc_fmt(detail, sizeof detail, "path '%s' is not a directory in revision %.12s", g->path, rev);
    work_fail(g, "no manifests in", detail, "point path at the directory that holds the *.json manifests");
  } else {
    rc = git_tree_lookup(sub, g->repo, git_tree_entry_id(te));
  }
  git_tree_entry_free(te);
  git_tree_free(root);
  git_commit_free(c);
  return rc < 0 ? -1 : 0;
}

/* Reads what changed between the last delivered commit and tip: nothing at
 * all when the commit has not moved, only diffed entries when it has. */
static int read_update(gitops *g, const git_oid *tip) {
  git_tree *sub = NULL, *old_sub = NULL;
  git_oid_tostr(g->upd.revision, sizeof g->upd.revision, tip);
  if (g->have_snap && git_oid_equal(&g->snap_commit, tip))
    return 0;
  if (tree_at_path(g, tip, &sub, 0) != 0)
    return -1;
  int rc = 0;
  if (g->have_snap && git_oid_equal(&g->snap_tree, git_tree_id(sub)))
    rc = 0; /* other directories moved; ours did not */
  else if (g->have_snap && tree_at_path(g, &g->snap_commit, &old_sub, 1) == 0 && old_sub)
    rc = read_diff(g, old_sub, sub);
  else
    rc = read_full(g, sub);
  if (rc == 0) {
    git_oid_cpy(&g->snap_tree, git_tree_id(sub));
    git_oid_cpy(&g->snap_commit, tip);
    g->have_snap = 1;
  }
  git_tree_free(old_sub);
  git_tree_free(sub);
  return rc;
}

/* ---- the cache's housekeeping ---- */

/* Every fetch that downloads leaves one more pack, and an open repository
 * keeps a descriptor and a mapping on every pack it has read: a long watch
 * would run out of descriptors. So past this many packs they are repacked
 * into one, and the repository is reopened after each fetch, which lets go
 * of packs that are gone. */
#define GITOPS_MAX_PACKS 8

static int pack_dir(gitops *g, char *buf, size_t size) {
  dc_fmt(buf, size, "%s/objects/pack", g->cache);
  return 0;
}

static int count_packs(gitops *g) {
  char dir[1200];
  pack_dir(g, dir, sizeof dir);
  DIR *d = opendir(dir);
  int n = 0;
  for (struct dirent *de = d ? readdir(d) : NULL; de; de = readdir(d)) {
    size_t len = strlen(de->d_name);
    n += len > 5 && strcmp(de->d_name + len - 5, ".pack") == 0;
  }
  if (d)
    closedir(d);
  return n;
}

/* Removes every pack file but pack-<keep>.* (the one just written). */
static void remove_packs_but(gitops *g, const char *keep) {
  char dir[1200], path[1600], name[128];
  pack_dir(g, dir, sizeof dir);
  dc_fmt(name, sizeof name, "pack-%s.", keep);
  DIR *d = opendir(dir);
  for (struct dirent *de = d ? readdir(d) : NULL; de; de = readdir(d)) {
    if (strncmp(de->d_name, "pack-", 5) != 0 || strncmp(de->d_name, name, strlen(name)) == 0)
      continue;
    dc_fmt(path, sizeof path, "%s/%s", dir, de->d_name);
    unlink(path);
  }
  if (d)
    closedir(d);
}

/* One pack holding everything the cache still needs: the branch's history
 * and the commit the next tree diff starts from (it may no longer be on
 * the branch after a force-push). A failure leaves the packs as they were:
 * repacking is housekeeping, never a reason for a fetch to fail. */
static void repack(gitops *g) {
  git_packbuilder *pb = NULL;
  git_revwalk *walk = NULL;
  if (git_packbuilder_new(&pb, g->repo) < 0 || git_revwalk_new(&walk, g->repo) < 0 ||
      git_revwalk_push_ref(walk, g->local_ref) < 0 || (g->have_snap && git_revwalk_push(walk, &g->snap_commit) < 0) ||
      git_packbuilder_insert_walk(pb, walk) < 0 || git_packbuilder_write(pb, NULL, 0, NULL, NULL) < 0) {
    git_revwalk_free(walk);
    git_packbuilder_free(pb);
    return;
  }
  char keep[GIT_OID_HEXSZ + 1];
  dc_strlcpy(keep, git_packbuilder_name(pb), sizeof keep);
  git_revwalk_free(walk);
  git_packbuilder_free(pb);
  remove_packs_but(g, keep);
}

/* Lets go of every pack descriptor and mapping the repository holds. */
static void reopen(gitops *g) {
  git_repository *fresh = NULL;
  if (git_repository_open_bare(&fresh, g->cache) < 0)
    return; /* keep the one we have */
  git_repository_free(g->repo);
  g->repo = fresh;
}

static void fetch_work(uv_work_t *w) {
  gitops *g = w->data;
  git_oid tip;
  int had_snap = g->have_snap;
  git_oid snap_commit = g->snap_commit, snap_tree = g->snap_tree;
  if (fetch_branch(g, &tip) != 0 || read_update(g, &tip) != 0) {
    /* Nothing half-read is delivered: the next update starts again from
     * the last one the owner saw. */
    gm_update_clear(&g->upd);
    g->have_snap = had_snap;
    g->snap_commit = snap_commit;
    g->snap_tree = snap_tree;
    if (!g->work_err[0])
      work_fail(g, "cannot fetch", "failed", "try again");
  }
  if (count_packs(g) > GITOPS_MAX_PACKS)
    repack(g);
  reopen(g);
}

static void fetch_done(uv_work_t *w, int status) {
  gitops *g = w->data;
  (void)status;
  g->busy = 0;
  if (g->orphaned) {
    destroy(g);
    return;
  }
  gitops_fetch_cb cb = g->cb;
  void *payload = g->payload;
  char err[DC_ERR_MAX];
  dc_strlcpy(err, g->work_err, sizeof err);
  cb(payload, err[0] ? NULL : &g->upd, err[0] ? err : NULL);
  gm_update_clear(&g->upd);
}

static void read_credentials(gitops *g) {
  const char *user = getenv("DEPLOY_GIT_USERNAME");
  const char *token = getenv("DEPLOY_GIT_TOKEN");
  const char *key = getenv("DEPLOY_GIT_SSH_KEY");
  dc_strlcpy(g->env_user, user ? user : "", sizeof g->env_user);
  dc_strlcpy(g->env_token, token ? token : "", sizeof g->env_token);
  dc_strlcpy(g->ssh_key, key ? key : "", sizeof g->ssh_key);
}

static int gm_fetch(gitops *g, gitops_fetch_cb cb, void *payload, char *err) {
  if (g->busy) {
    dc_fmt(err, DC_ERR_MAX, "deploy: gitops: a fetch of %s is already running: wait for it", g->redacted);
    return -1;
  }
  read_credentials(g);
  g->cred_calls = 0;
  g->cred_err[0] = '\0';
  g->work_err[0] = '\0';
  g->cancel = 0;
  memset(&g->stats, 0, sizeof g->stats);
  gm_update_clear(&g->upd);
  g->cb = cb;
  g->payload = payload;
  g->work.data = g;
  if (uv_queue_work(g->e->loop, &g->work, fetch_work, fetch_done) != 0) {
    dc_fmt(err, DC_ERR_MAX, "deploy: gitops: cannot queue the fetch of %s on the thread pool", g->redacted);
    return -1;
  }
  g->busy = 1;
  return 0;
}


/* ---- the module's one entry point ---- */

__attribute__((visibility("default"))) const gitops_api deploy_git_api = {
    .version = GITOPS_API_VERSION,
    .open = gm_open,
    .free = gm_free,
    .url = gm_url,
    .branch = gm_branch,
    .path = gm_path,
    .cache = gm_cache,
    .last_stats = gm_last_stats,
    .busy = gm_busy,
    .cancel = gm_cancel,
    .fetch = gm_fetch,
};
