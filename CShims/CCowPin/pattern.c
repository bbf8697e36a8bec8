/* cowpin's content pattern: fill and check. Async-signal-safe (a child
 * checks its view with these). */
#include "cowpin_shim.h"

#include <string.h>

/* One 64-bit word of the pattern: a mix of the seed and the word's index. */
/* The case's pattern: word i is a hash of (seed, i mod 512) salted with the
 * page number (i / 512), so every 8 bytes of a page differ, every page
 * differs, and filling or checking costs one xor per word after 512 hashes. */
#define PATTERN_PAGE_WORDS 512

static uint64_t pattern_mix(uint32_t seed, uint64_t k)
{
    uint64_t x = k * 0x9E3779B97F4A7C15ull ^ (((uint64_t)seed << 32) | seed);
    x ^= x >> 31;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 29;
    return x;
}

static uint64_t pattern_salt(uint64_t page) { return page * 0xD1B54A32D192ED03ull; }

static uint64_t pattern_word(uint32_t seed, uint64_t word_index)
{
    return pattern_mix(seed, word_index % PATTERN_PAGE_WORDS) ^ pattern_salt(word_index / PATTERN_PAGE_WORDS);
}

static void pattern_table(uint32_t seed, uint64_t table[PATTERN_PAGE_WORDS])
{
    for (uint64_t k = 0; k < PATTERN_PAGE_WORDS; k++)
        table[k] = pattern_mix(seed, k);
}

uint8_t cp_pattern_byte(uint32_t seed, size_t offset)
{
    return (uint8_t)(pattern_word(seed, offset >> 3) >> ((offset & 7) * 8));
}

/* The words of one pattern page from a word index on: the table entries,
 * the page's salt, and how many (to the page's end, at most `avail`). Going
 * a page at a time keeps the salt constant, so the loops over it vectorise. */
struct pattern_run {
    const uint64_t *table;
    uint64_t salt;
    size_t words;
};

static struct pattern_run pattern_run_at(const uint64_t *table, uint64_t word_index, size_t avail)
{
    size_t k = (size_t)(word_index % PATTERN_PAGE_WORDS), n = PATTERN_PAGE_WORDS - k;
    return (struct pattern_run){table + k, pattern_salt(word_index / PATTERN_PAGE_WORDS), n < avail ? n : avail};
}

/* Async-signal-safe (a child may fill): the table lives on the stack. */
void cp_fill_pattern(void *addr, size_t len, uint32_t seed, size_t base_offset)
{
    uint8_t *p = addr;
    size_t i = 0;
    while (i < len && ((base_offset + i) & 7))
        p[i] = cp_pattern_byte(seed, base_offset + i), i++;
    if (len - i >= 8) {
        uint64_t table[PATTERN_PAGE_WORDS];
        pattern_table(seed, table);
        while (len - i >= 8) {
            struct pattern_run r = pattern_run_at(table, (base_offset + i) >> 3, (len - i) / 8);
            for (size_t k = 0; k < r.words; k++) {
                uint64_t w = r.table[k] ^ r.salt;
                memcpy(p + i + 8 * k, &w, 8);
            }
            i += 8 * r.words;
        }
    }
    for (; i < len; i++)
        p[i] = cp_pattern_byte(seed, base_offset + i);
}

int cp_matches_pattern(const void *buf, size_t len, uint32_t seed, size_t base_offset)
{
    const uint8_t *p = buf;
    size_t i = 0;
    while (i < len && ((base_offset + i) & 7)) {
        if (p[i] != cp_pattern_byte(seed, base_offset + i))
            return 0;
        i++;
    }
    if (len - i >= 8) {
        uint64_t table[PATTERN_PAGE_WORDS];
        pattern_table(seed, table);
        /* A pattern page at a time: or the xor of every word, then test. */
        while (len - i >= 8) {
            struct pattern_run r = pattern_run_at(table, (base_offset + i) >> 3, (len - i) / 8);
            uint64_t diff = 0;
            for (size_t k = 0; k < r.words; k++) {
                uint64_t w;
                memcpy(&w, p + i + 8 * k, 8);
                diff |= w ^ r.table[k] ^ r.salt;
            }
            if (diff)
                return 0;
            i += 8 * r.words;
        }
    }
    for (; i < len; i++)
        if (p[i] != cp_pattern_byte(seed, base_offset + i))
            return 0;
    return 1;
}

int cp_all_equal(const void *buf, size_t len, uint8_t byte)
{
    const uint8_t *p = buf;
    size_t head = len < 256 ? len : 256;
    for (size_t i = 0; i < head; i++)
        if (p[i] != byte)
            return 0;
    /* The head holds only `byte`; the rest does too exactly when the buffer
     * equals itself shifted by the head's length (memcmp is vectorised). */
    return len == head || memcmp(p, p + head, len - head) == 0;
}
