/*
 * leaky-server: a toy request-serving loop with one leak, to try memscope on.
 *
 *   leaky-server [REQUESTS [DELAY_US]]     defaults: 200 requests, 1000 us apart
 *
 * Request i has kind i % 4:
 *   0, 2  GET     read_request, parse_headers, build_response
 *   1     UPLOAD  read_request, parse_headers, store_upload
 *   3     REPORT  read_request, parse_headers, handle_report
 * Every allocation is freed before its request ends (malloc, calloc, realloc,
 * reallocarray, posix_memalign: churn), except one: each REPORT request's
 * handle_report -> cache_report_result mallocs REPORT_CACHE_BYTES for a result
 * cache that only grows. So after N requests exactly (N / 4) * 65536 bytes
 * are live, all from one call of malloc in cache_report_result; N = 200 leaks
 * 50 blocks, 3276800 bytes. stdout uses a static buffer, so stdio allocates
 * nothing.
 *
 * The fix, built with -DBOUNDED_CACHE: the cache keeps the last
 * CACHE_ENTRIES results and frees the older ones, so it levels off at
 * CACHE_ENTRIES * 65536 bytes (`memscope check` passes it; docs/ci.md).
 *
 * Build (frame pointers give memscope whole stacks; -O0 and
 * -fno-builtin-malloc keep gcc from removing malloc/free pairs):
 *   gcc -O0 -g -fno-omit-frame-pointer -fno-builtin-malloc -pthread \
 *       -Wall -Wextra -o leaky-server leaky-server.c
 */
#define _DEFAULT_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define DEFAULT_REQUESTS 200L
#define DEFAULT_DELAY_US 1000L
#define REPORT_EVERY 4
#define REPORT_CACHE_BYTES 65536
#define READ_CHUNK 512
#define CACHE_ENTRIES 8

struct header {
    size_t name_offset;
    size_t value_offset;
};

struct request {
    unsigned long id;
    char *body;
    size_t len;
    struct header *headers;
    size_t header_count;
};

/* A cached report: one malloc(REPORT_CACHE_BYTES) holds the entry and its text. */
struct cache_entry {
    struct cache_entry *next;
    unsigned long request_id;
    size_t text_len;
    char text[];
};

static pthread_mutex_t cache_lock = PTHREAD_MUTEX_INITIALIZER;
static struct cache_entry *report_cache;
static unsigned long cached_reports;
/* Keeps the work observable so that nothing is optimized away. */
static volatile unsigned long checksum;

static void fail(const char *what) {
    fprintf(stderr, "leaky-server: out of memory in %s\n", what);
    exit(1);
}

/* Reads the request body "from the socket" in chunks into a buffer that
 * starts at 256 bytes and doubles with realloc. */
__attribute__((noinline)) static void read_request(struct request *req, unsigned long id) {
    size_t want = 300 + (id * 97) % 4000;
    size_t cap = 256;
    char *buf = malloc(cap);
    if (buf == NULL) fail("read_request");
    size_t len = 0;
    while (len < want) {
        size_t n = want - len < READ_CHUNK ? want - len : READ_CHUNK;
        while (len + n > cap) {
            cap *= 2;
            char *grown = realloc(buf, cap);
            if (grown == NULL) fail("read_request");
            buf = grown;
        }
        for (size_t k = 0; k < n; k++) buf[len + k] = (char)('a' + (len + k) % 26);
        len += n;
    }
    req->id = id;
    req->body = buf;
    req->len = len;
}

/* Indexes 4 to 13 headers: a calloc'd table of 8, grown with reallocarray. */
__attribute__((noinline)) static void parse_headers(struct request *req) {
    size_t count = 4 + req->id % 10;
    size_t cap = 8;
    struct header *headers = calloc(cap, sizeof *headers);
    if (headers == NULL) fail("parse_headers");
    for (size_t k = 0; k < count; k++) {
        if (k == cap) {
            cap *= 2;
            struct header *grown = reallocarray(headers, cap, sizeof *headers);
            if (grown == NULL) fail("parse_headers");
            headers = grown;
        }
        headers[k].name_offset = (k * 31) % req->len;
        headers[k].value_offset = (k * 57) % req->len;
    }
    req->headers = headers;
    req->header_count = count;
}

__attribute__((noinline)) static void free_request(struct request *req) {
    free(req->headers);
    free(req->body);
    req->headers = NULL;
    req->body = NULL;
}

/* GET: a response of status line plus body, sent and freed. */
__attribute__((noinline)) static void build_response(const struct request *req) {
    size_t cap = req->len + 128;
    char *response = malloc(cap);
    if (response == NULL) fail("build_response");
    int head = snprintf(response, cap, "HTTP/1.1 200 OK\r\nContent-Length: %zu\r\n\r\n", req->len);
    memcpy(response + head, req->body, req->len);
    checksum += (unsigned char)response[head + req->len / 2];
    free(response);
}

/* UPLOAD: the body goes through a 4 KiB aligned I/O buffer. */
__attribute__((noinline)) static void store_upload(const struct request *req) {
    void *io = NULL;
    if (posix_memalign(&io, 64, 4096) != 0) fail("store_upload");
    size_t n = req->len < 4096 ? req->len : 4096;
    memcpy(io, req->body, n);
    checksum += ((unsigned char *)io)[n - 1];
    free(io);
}

/* The leak: every report is cached and nothing ever evicts or frees it. */
__attribute__((noinline)) static void cache_report_result(unsigned long id, const char *text, size_t len) {
    struct cache_entry *entry = malloc(REPORT_CACHE_BYTES);
    if (entry == NULL) fail("cache_report_result");
    size_t room = REPORT_CACHE_BYTES - sizeof *entry;
    entry->request_id = id;
    entry->text_len = len < room ? len : room;
    memcpy(entry->text, text, entry->text_len);
    pthread_mutex_lock(&cache_lock);
    entry->next = report_cache;
    report_cache = entry;
    cached_reports++;
#ifdef BOUNDED_CACHE
    if (cached_reports > CACHE_ENTRIES) {
        /* Drop the oldest: the last of the list. */
        struct cache_entry *last = report_cache;
        while (last->next->next != NULL) last = last->next;
        free(last->next);
        last->next = NULL;
        cached_reports--;
    }
#endif
    pthread_mutex_unlock(&cache_lock);
}

/* REPORT: renders into a temporary buffer (freed), then caches the result. */
__attribute__((noinline)) static void handle_report(const struct request *req) {
    size_t cap = 1024;
    char *text = malloc(cap);
    if (text == NULL) fail("handle_report");
    int len = snprintf(text, cap, "report for request %lu: %zu body bytes, %zu headers\n",
                       req->id, req->len, req->header_count);
    cache_report_result(req->id, text, (size_t)len);
    free(text);
}

__attribute__((noinline)) static void serve_request(unsigned long id) {
    struct request req;
    read_request(&req, id);
    parse_headers(&req);
    switch (id % REPORT_EVERY) {
    case 1:
        store_upload(&req);
        break;
    case REPORT_EVERY - 1:
        handle_report(&req);
        break;
    default:
        build_response(&req);
        break;
    }
    free_request(&req);
}

static long parse_count(const char *text, const char *what) {
    char *end = NULL;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || value < 0) {
        fprintf(stderr, "leaky-server: invalid %s %s\nusage: leaky-server [REQUESTS [DELAY_US]]\n",
                what, text);
        exit(2);
    }
    return value;
}

int main(int argc, char **argv) {
    static char stdout_buffer[BUFSIZ];
    setvbuf(stdout, stdout_buffer, _IOLBF, sizeof stdout_buffer);
    if (argc > 3) {
        fprintf(stderr, "usage: leaky-server [REQUESTS [DELAY_US]]\n");
        return 2;
    }
    long requests = argc > 1 ? parse_count(argv[1], "request count") : DEFAULT_REQUESTS;
    long delay_us = argc > 2 ? parse_count(argv[2], "delay") : DEFAULT_DELAY_US;
    struct timespec delay = {.tv_sec = delay_us / 1000000, .tv_nsec = (delay_us % 1000000) * 1000};

    for (long i = 0; i < requests; i++) {
        serve_request((unsigned long)i);
        if (delay_us > 0) nanosleep(&delay, NULL);
    }

    unsigned long long leaked = (unsigned long long)cached_reports * REPORT_CACHE_BYTES;
#ifdef BOUNDED_CACHE
    printf("leaky-server: served %ld requests, %llu bytes cached in the last %d results\n",
           requests, leaked, CACHE_ENTRIES);
#else
    printf("leaky-server: served %ld requests, leaked %llu bytes from cache_report_result\n",
           requests, leaked);
#endif
    return 0;
}
