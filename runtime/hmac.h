/* HMAC-SHA256 for signed webhooks, outgoing (X-Deploy-Signature) and
 * incoming (GitHub's X-Hub-Signature-256, a generic HMAC header), through
 * OpenSSL's libcrypto: no hand-written hash. */
#ifndef DEPLOY_HMAC_H
#define DEPLOY_HMAC_H

#include <stddef.h>

#define DC_SHA256_HEX 65 /* 64 hex digits and the NUL */

/* hex receives the lowercase hex digest of HMAC-SHA256(key, data). 0, or
 * -1 when libcrypto fails (then hex is ""). */
int dc_hmac_sha256_hex(const void *key, size_t keylen, const void *data, size_t len, char hex[DC_SHA256_HEX]);

/* 1 when the two strings are equal, compared in time that depends only on
 * their lengths (a signature check must not tell an attacker how many of
 * its first bytes were right). */
int dc_equal_secret(const char *a, const char *b);

#endif
