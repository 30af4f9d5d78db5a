/* engine/unicode.c — strict UTF-8 and code point classes for the tokenizer.
 *
 * The class lookup has an ASCII fast path (most text is ASCII) and otherwise does a
 * binary search over the generated range table.
 */
#include "engine/unicode.h"

int mn__utf8_check(const uint8_t *s, size_t n)
{
    uint8_t b = s[0];
    if (b < 0x80)
        return 1;
    int need;
    uint8_t lo = 0x80, hi = 0xBF;   /* allowed range of the second byte */
    if (b >= 0xC2 && b <= 0xDF) {
        need = 2;
    } else if (b >= 0xE0 && b <= 0xEF) {
        need = 3;
        if (b == 0xE0) lo = 0xA0;          /* no overlongs */
        if (b == 0xED) hi = 0x9F;          /* no surrogates */
    } else if (b >= 0xF0 && b <= 0xF4) {
        need = 4;
        if (b == 0xF0) lo = 0x90;          /* no overlongs */
        if (b == 0xF4) hi = 0x8F;          /* nothing above U+10FFFF */
    } else {
        return -1;                          /* 80..C1 (continuation, overlong lead), F5..FF */
    }
    for (int i = 1; i < need; i++) {
        if ((size_t)i >= n)
            return 0;
        uint8_t c = s[i];
        uint8_t l = i == 1 ? lo : 0x80, h = i == 1 ? hi : 0xBF;
        if (c < l || c > h)
            return -1;
    }
    return need;
}

int mn__utf8_decode(const uint8_t *s, size_t n, int32_t *cp)
{
    int k = mn__utf8_check(s, n);
    if (k <= 0) {
        *cp = -1;
        return 1;
    }
    switch (k) {
    case 1: *cp = s[0]; break;
    case 2: *cp = ((int32_t)(s[0] & 0x1F) << 6) | (s[1] & 0x3F); break;
    case 3: *cp = ((int32_t)(s[0] & 0x0F) << 12) | ((int32_t)(s[1] & 0x3F) << 6) | (s[2] & 0x3F); break;
    default:
        *cp = ((int32_t)(s[0] & 0x07) << 18) | ((int32_t)(s[1] & 0x3F) << 12) |
              ((int32_t)(s[2] & 0x3F) << 6) | (s[3] & 0x3F);
        break;
    }
    return k;
}

int mn__utf8_encode(uint32_t cp, char *out)
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

uint8_t mn__ucat(int32_t cp)
{
    if (cp < 0)
        return 0;
    if (cp < 0x80) {
        if ((cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z'))
            return MN__UC_L;
        if (cp >= '0' && cp <= '9')
            return MN__UC_N;
        if (cp == ' ' || (cp >= 0x09 && cp <= 0x0D))
            return MN__UC_WS;
        return 0;
    }
    uint32_t lo = 0, hi = mn__unicode_n_ranges;
    while (lo < hi) {
        uint32_t mid = (lo + hi) / 2;
        const mn__urange *r = &mn__unicode_ranges[mid];
        if ((uint32_t)cp < r->lo)
            hi = mid;
        else if ((uint32_t)cp > r->hi)
            lo = mid + 1;
        else
            return r->flags;
    }
    return 0;
}
