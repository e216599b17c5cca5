/*
 * allocbench: the allocation workload behind `cargo xtask bench`.
 *
 *   allocbench tight|mixed|threads|leak|hold [OPS]     (default 500000)
 *
 * tight    malloc(64) then free, in a loop
 * mixed    sizes 16..4096 into a ring of 1024 slots; a slot's old block is
 *          freed when it is replaced (bounded live set)
 * threads  mixed on 2 threads, OPS/2 each
 * leak     mixed, but every 16th block is kept (never freed)
 * hold     malloc(32) OPS times, every block kept: OPS live at the end
 *
 * One op is one malloc and (except for kept blocks) one free. The loop is
 * timed alone with CLOCK_MONOTONIC after an untimed warm-up, and the result
 * is printed as one machine-readable line:
 *
 *   ns_per_op=123.4 ops=1000000 workload=tight
 *
 * With BENCH_WAIT_STDIN=1 it prints "ready <pid>" after the warm-up and
 * blocks until a byte (or EOF) arrives on stdin, so a tracer can attach to
 * the pid before the timed loop starts.
 *
 * Build: gcc -O2 -fno-omit-frame-pointer -fno-builtin-malloc -pthread
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define RING 1024
#define KEEP_EVERY 16
#define WARMUP_OPS 20000

/* The compiler must not see through malloc/free (-fno-builtin-malloc) nor
 * drop a block it never reads: touch every block through this. */
static volatile unsigned char sink;

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static __attribute__((noinline)) void tight(long ops)
{
    for (long i = 0; i < ops; i++) {
        unsigned char *p = malloc(64);
        if (!p)
            abort();
        p[0] = (unsigned char)i;
        sink = p[0];
        free(p);
    }
}

/* xorshift: cheap sizes, the same sequence in every run */
static inline uint32_t next_rand(uint32_t *s)
{
    uint32_t x = *s;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *s = x;
}

struct mixed_args {
    long ops;
    int keep_every; /* 0: free everything */
    uint32_t seed;
};

static __attribute__((noinline)) void mixed_loop(const struct mixed_args *a)
{
    void *ring[RING] = {0};
    uint32_t s = a->seed;
    for (long i = 0; i < a->ops; i++) {
        size_t size = 16 + next_rand(&s) % (4096 - 16 + 1);
        unsigned char *p = malloc(size);
        if (!p)
            abort();
        p[0] = (unsigned char)i;
        sink = p[0];
        unsigned slot = (unsigned)(i % RING);
        if (a->keep_every && i % a->keep_every == 0) {
            /* leaked: its slot keeps the old block */
            continue;
        }
        free(ring[slot]);
        ring[slot] = p;
    }
    for (unsigned i = 0; i < RING; i++)
        free(ring[i]);
}

static void *mixed_thread(void *arg)
{
    mixed_loop(arg);
    return NULL;
}

/* Kept until the exit: the live set memscope has to hold and report. */
static __attribute__((noinline)) void hold(long ops)
{
    for (long i = 0; i < ops; i++) {
        unsigned char *p = malloc(32);
        if (!p)
            abort();
        p[0] = (unsigned char)i;
        sink = p[0];
    }
}

static void run(const char *workload, long ops)
{
    if (!strcmp(workload, "tight")) {
        tight(ops);
    } else if (!strcmp(workload, "hold")) {
        hold(ops);
    } else if (!strcmp(workload, "mixed")) {
        struct mixed_args a = {ops, 0, 2463534242u};
        mixed_loop(&a);
    } else if (!strcmp(workload, "leak")) {
        struct mixed_args a = {ops, KEEP_EVERY, 2463534242u};
        mixed_loop(&a);
    } else if (!strcmp(workload, "threads")) {
        struct mixed_args a[2] = {{ops / 2, 0, 2463534242u}, {ops / 2, 0, 88675123u}};
        pthread_t t[2];
        for (int i = 0; i < 2; i++)
            if (pthread_create(&t[i], NULL, mixed_thread, &a[i]))
                abort();
        for (int i = 0; i < 2; i++)
            pthread_join(t[i], NULL);
    } else {
        fprintf(stderr, "allocbench: unknown workload %s (tight, mixed, threads, leak, hold)\n", workload);
        exit(2);
    }
}

int main(int argc, char **argv)
{
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: allocbench tight|mixed|threads|leak|hold [OPS]\n");
        return 2;
    }
    const char *workload = argv[1];
    long ops = argc == 3 ? atol(argv[2]) : 500000;
    if (ops < 2) {
        fprintf(stderr, "allocbench: OPS must be at least 2\n");
        return 2;
    }

    /* Warm-up: fault in the heap and libc's lazy bindings, untimed. The
     * keeping workloads' warm-up must not keep, so it runs "mixed". */
    int keeps = !strcmp(workload, "leak") || !strcmp(workload, "hold");
    run(keeps ? "mixed" : workload, WARMUP_OPS);

    const char *wait = getenv("BENCH_WAIT_STDIN");
    if (wait && *wait && strcmp(wait, "0")) {
        printf("ready %d\n", (int)getpid());
        fflush(stdout);
        char byte;
        while (read(0, &byte, 1) < 0)
            ;
    }

    double start = now_ns();
    run(workload, ops);
    double elapsed = now_ns() - start;

    long total = !strcmp(workload, "threads") ? 2 * (ops / 2) : ops;
    /* threads: wall time over the ops of both threads (a throughput figure
     * on 2 cores, not the per-thread latency) */
    printf("ns_per_op=%.1f ops=%ld workload=%s\n", elapsed / (double)total, total, workload);
    fflush(stdout);
    return 0;
}
