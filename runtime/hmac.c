#include "hmac.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <string.h>

int dc_hmac_sha256_hex(const void *key, size_t keylen, const void *data, size_t len, char hex[DC_SHA256_HEX]) {
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  static const char digits[] = "0123456789abcdef";
  hex[0] = '\0';
  /* HMAC() with a NULL key pointer and length 0 is refused by some builds:
   * an empty key is given as a pointer to zero bytes */
  if (!HMAC(EVP_sha256(), keylen ? key : "", (int)keylen, data, len, mac, &n) || n != 32)
    return -1;
  for (unsigned int i = 0; i < n; i++) {
    hex[2 * i] = digits[mac[i] >> 4];
    hex[2 * i + 1] = digits[mac[i] & 15];
  }
  hex[2 * n] = '\0';
  return 0;
}

int dc_equal_secret(const char *a, const char *b) {
  size_t la = strlen(a), lb = strlen(b);
  if (la != lb)
    return 0;
  return CRYPTO_memcmp(a, b, la) == 0;
}
