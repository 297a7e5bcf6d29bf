/*
 * qgw benchmark load generator: a QoS 0/1 MQTT 3.1.1 publisher at a fixed offered rate (or a
 * burst behind a window of unacknowledged messages) and the matching subscriber, both on
 * libmosquitto (Debian libmosquitto-dev). Built by `make bench` into bench/build/loadgen.
 *
 *   loadgen pub -p PORT -t TOPIC -n COUNT -s SIZE -r RUN [-H HOST] [-q QOS] [-R RATE] [-w WINDOW]
 *   loadgen sub -p PORT -t TOPIC -n COUNT -r RUN [-H HOST] [-q QOS] [-T TIMEOUT_S] [-I IDLE_S]
 *
 * Payload (docs/benchmarks.md, "Load generator"): 24 bytes, host byte order, then padding:
 *   u32 magic 0x51475742 ("QGWB") | u32 run id | u64 sequence number (0..COUNT-1)
 *   | u64 send time, CLOCK_MONOTONIC ns, taken just before mosquitto_publish()
 * CLOCK_MONOTONIC is one clock for every process on the machine, so receive time - send time
 * is the end-to-end latency without clock synchronisation.
 *
 * pub: RATE 0 (default) is a burst: publish as fast as the window of WINDOW messages not yet
 * acknowledged by the broker allows. RATE > 0 publishes message i at t0 + i / RATE (absolute
 * deadlines, so a late wake-up does not lower the offered load). It waits for every PUBACK.
 * sub: prints "ready" once subscribed, then counts messages of run RUN: duplicates (a sequence
 * number seen before), foreign (wrong magic, run or size), lost = COUNT - distinct. It stops at
 * COUNT distinct messages, after IDLE_S without a message (once one arrived, or TIMEOUT_S
 * without any), or at TIMEOUT_S.
 * Both print one JSON object on the last line of stdout, including the process's own CPU time
 * (getrusage), so the harness can show that the load generator is not the bottleneck.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <mosquitto.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x51475742u
#define HEADER_BYTES 24

struct opts {
    const char *host;
    int port;
    const char *topic;
    long count;
    long size;
    uint32_t run;
    int qos;
    double rate;
    long window;
    double timeout_s;
    double idle_s;
};

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static double cpu_us(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec * 1e6 + (double)ru.ru_utime.tv_usec +
           (double)ru.ru_stime.tv_sec * 1e6 + (double)ru.ru_stime.tv_usec;
}

static long max_rss_kib(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss;
}

static void die(const char *what, int rc) {
    fprintf(stderr, "loadgen: %s: %s\n", what, rc == MOSQ_ERR_ERRNO ? strerror(errno)
                                                                  : mosquitto_strerror(rc));
    exit(2);
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen pub|sub -p PORT -t TOPIC -n COUNT -r RUN [-s SIZE] [-H HOST] [-q QOS]\n"
            "               [-R RATE] [-w WINDOW] [-T TIMEOUT_S] [-I IDLE_S]\n");
    exit(2);
}

/* ---------------------------------------------------------------- publisher ---------- */

/* Single-threaded: libmosquitto's external-loop API (mosquitto_socket, loop_read/_write/_misc)
 * under our own ppoll() with a nanosecond deadline, so the paced mode wakes exactly when the
 * next message is due and no per-message thread hand-off or lock costs CPU. */

struct pub_state {
    long acked;
    int connect_rc;
};

static void pub_on_connect(struct mosquitto *m, void *u, int rc) {
    (void)m;
    ((struct pub_state *)u)->connect_rc = rc;
}

static void pub_on_publish(struct mosquitto *m, void *u, int mid) {
    (void)m;
    (void)mid;
    ((struct pub_state *)u)->acked++;
}

/* wait for socket readiness until deadline_ns (CLOCK_MONOTONIC), then service the socket */
static void pub_service(struct mosquitto *m, uint64_t deadline_ns) {
    int fd = mosquitto_socket(m);
    if (fd < 0) die("socket", MOSQ_ERR_NO_CONN);
    struct pollfd pfd = {fd, POLLIN, 0};
    if (mosquitto_want_write(m)) pfd.events |= POLLOUT;
    uint64_t t = now_ns();
    uint64_t wait = deadline_ns > t ? deadline_ns - t : 0;
    struct timespec ts = {(time_t)(wait / 1000000000u), (long)(wait % 1000000000u)};
    int n = ppoll(&pfd, 1, &ts, NULL);
    if (n < 0 && errno != EINTR) die("ppoll", MOSQ_ERR_ERRNO);
    int rc;
    if (n > 0 && (pfd.revents & (POLLIN | POLLERR | POLLHUP))) {
        rc = mosquitto_loop_read(m, 1);
        if (rc) die("read", rc);
    }
    if (n > 0 && (pfd.revents & POLLOUT)) {
        rc = mosquitto_loop_write(m, 1);
        if (rc) die("write", rc);
    }
}

static int run_pub(const struct opts *o) {
    struct pub_state st = {0, -1};
    char id[64];
    snprintf(id, sizeof id, "loadgen-pub-%u-%d", o->run, (int)getpid());
    struct mosquitto *m = mosquitto_new(id, true, &st);
    if (!m) die("mosquitto_new", MOSQ_ERR_ERRNO);
    mosquitto_int_option(m, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V311);
    mosquitto_int_option(m, MOSQ_OPT_SEND_MAXIMUM, (int)o->window);
    mosquitto_int_option(m, MOSQ_OPT_TCP_NODELAY, 1);
    mosquitto_connect_callback_set(m, pub_on_connect);
    mosquitto_publish_callback_set(m, pub_on_publish);
    int rc = mosquitto_connect(m, o->host, o->port, 60);
    if (rc) die("connect", rc);
    uint64_t dl = now_ns() + 10000000000u;
    while (st.connect_rc < 0 && now_ns() < dl) pub_service(m, now_ns() + 100000000u);
    if (st.connect_rc != 0) {
        fprintf(stderr, "loadgen: pub could not connect to %s:%d\n", o->host, o->port);
        return 2;
    }

    unsigned char *payload = calloc(1, (size_t)o->size);
    if (!payload) die("calloc", MOSQ_ERR_NOMEM);
    memset(payload + HEADER_BYTES, 'x', (size_t)(o->size - HEADER_BYTES));
    uint32_t magic = MAGIC;
    memcpy(payload, &magic, 4);
    memcpy(payload + 4, &o->run, 4);

    double cpu0 = cpu_us();
    uint64_t t0 = now_ns(), first = 0, last = 0, misc_at = t0;
    long late = 0, sent = 0, errors = 0;
    uint64_t ack_deadline = 0;
    for (;;) {
        uint64_t t = now_ns();
        /* publish everything that is due and fits in the window (a burst: at most 64 in a row,
         * then read PUBACKs) */
        for (int k = 0; k < 64 && sent < o->count; k++) {
            if (o->qos > 0 && sent - st.acked >= o->window) break;
            uint64_t due = o->rate > 0 ? t0 + (uint64_t)((double)sent * 1e9 / o->rate) : 0;
            if (due > t) break;
            if (due && t - due > 1000000u) late++; /* more than 1 ms behind schedule */
            uint64_t seq = (uint64_t)sent, ts = now_ns();
            memcpy(payload + 8, &seq, 8);
            memcpy(payload + 16, &ts, 8);
            rc = mosquitto_publish(m, NULL, o->topic, (int)o->size, payload, o->qos, false);
            if (rc) {
                if (++errors > 100) die("publish", rc);
                break;
            }
            if (sent == 0) first = ts;
            last = ts;
            sent++;
            t = ts;
        }
        if (sent >= o->count && (o->qos == 0 || st.acked >= sent)) break;
        if (sent >= o->count && !ack_deadline) ack_deadline = now_ns() + 60000000000u;
        if (ack_deadline && now_ns() > ack_deadline) break; /* every PUBACK, at most 60 s */
        uint64_t until = now_ns() + 1000000000u;
        int window_open = o->qos == 0 || sent - st.acked < o->window;
        if (sent < o->count && window_open) {
            until = o->rate > 0 ? t0 + (uint64_t)((double)sent * 1e9 / o->rate) : now_ns();
        }
        pub_service(m, until);
        if (now_ns() - misc_at > 1000000000u) {
            mosquitto_loop_misc(m); /* keepalive */
            misc_at = now_ns();
        }
    }
    uint64_t done = now_ns();
    double cpu1 = cpu_us();
    long got_acks = st.acked;
    mosquitto_disconnect(m);
    for (int i = 0; i < 10 && mosquitto_want_write(m); i++) pub_service(m, now_ns() + 10000000u);
    mosquitto_destroy(m);
    double span = (double)(last - first) / 1e9;
    printf("{\"role\": \"pub\", \"run\": %u, \"count\": %ld, \"sent\": %ld, \"acked\": %ld, "
           "\"payload_bytes\": %ld, \"qos\": %d, \"rate\": %.3f, \"window\": %ld, "
           "\"first_send_ns\": %" PRIu64 ", \"last_send_ns\": %" PRIu64 ", \"done_ns\": %" PRIu64
           ", \"send_rate\": %.3f, \"late\": %ld, \"publish_errors\": %ld, "
           "\"cpu_us\": %.0f, \"cpu_us_total\": %.0f, \"max_rss_kib\": %ld}\n",
           o->run, o->count, sent, got_acks, o->size, o->qos, o->rate, o->window, first, last,
           done, span > 0 ? (double)(sent - 1) / span : 0.0, late, errors, cpu1 - cpu0,
           cpu1, max_rss_kib());
    free(payload);
    return o->qos > 0 && got_acks < sent ? 1 : 0;
}

/* ---------------------------------------------------------------- subscriber --------- */

struct sub_state {
    const struct opts *o;
    unsigned char *seen; /* bitmap of sequence numbers */
    int64_t *lat_ns;
    long distinct, duplicates, foreign;
    uint64_t first_recv, last_recv;
    int subscribed;
};

static void sub_on_connect(struct mosquitto *m, void *u, int rc) {
    struct sub_state *s = u;
    if (rc) {
        fprintf(stderr, "loadgen: sub connect refused: %s\n", mosquitto_connack_string(rc));
        exit(2);
    }
    rc = mosquitto_subscribe(m, NULL, s->o->topic, s->o->qos);
    if (rc) die("subscribe", rc);
}

static void sub_on_subscribe(struct mosquitto *m, void *u, int mid, int n, const int *granted) {
    (void)m;
    (void)mid;
    struct sub_state *s = u;
    if (n < 1 || granted[0] > 2) {
        fprintf(stderr, "loadgen: subscription refused\n");
        exit(2);
    }
    s->subscribed = 1;
    printf("ready\n");
    fflush(stdout);
}

static void sub_on_message(struct mosquitto *m, void *u, const struct mosquitto_message *msg) {
    (void)m;
    struct sub_state *s = u;
    uint64_t t = now_ns();
    uint32_t magic, run;
    uint64_t seq, sent;
    if (msg->payloadlen < HEADER_BYTES) {
        s->foreign++;
        return;
    }
    memcpy(&magic, msg->payload, 4);
    memcpy(&run, (char *)msg->payload + 4, 4);
    memcpy(&seq, (char *)msg->payload + 8, 8);
    memcpy(&sent, (char *)msg->payload + 16, 8);
    if (magic != MAGIC || run != s->o->run || seq >= (uint64_t)s->o->count ||
        msg->payloadlen != s->o->size) {
        s->foreign++;
        return;
    }
    if (s->seen[seq >> 3] & (1u << (seq & 7))) {
        s->duplicates++;
        return;
    }
    s->seen[seq >> 3] |= (unsigned char)(1u << (seq & 7));
    s->lat_ns[s->distinct++] = (int64_t)(t - sent);
    if (!s->first_recv) s->first_recv = t;
    s->last_recv = t;
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* nearest-rank percentile of a sorted array, in ms */
static double pct_ms(const int64_t *v, long n, double p) {
    if (n <= 0) return -1.0;
    long k = (long)((p / 100.0) * (double)n + 0.999999) - 1;
    if (k < 0) k = 0;
    if (k >= n) k = n - 1;
    return (double)v[k] / 1e6;
}

static int run_sub(const struct opts *o) {
    struct sub_state s = {0};
    s.o = o;
    s.seen = calloc((size_t)(o->count / 8 + 1), 1);
    s.lat_ns = calloc((size_t)o->count, sizeof(int64_t));
    if (!s.seen || !s.lat_ns) die("calloc", MOSQ_ERR_NOMEM);
    char id[64];
    snprintf(id, sizeof id, "loadgen-sub-%u-%d", o->run, (int)getpid());
    struct mosquitto *m = mosquitto_new(id, true, &s);
    if (!m) die("mosquitto_new", MOSQ_ERR_ERRNO);
    mosquitto_int_option(m, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V311);
    mosquitto_int_option(m, MOSQ_OPT_TCP_NODELAY, 1);
    mosquitto_connect_callback_set(m, sub_on_connect);
    mosquitto_subscribe_callback_set(m, sub_on_subscribe);
    mosquitto_message_callback_set(m, sub_on_message);
    int rc = mosquitto_connect(m, o->host, o->port, 60);
    if (rc) die("connect", rc);
    uint64_t start = now_ns(), ready_at = 0, last_seen = 0;
    long last_count = -1;
    double cpu_ready = 0;
    const char *stop = "timeout";
    for (;;) {
        rc = mosquitto_loop(m, 50, 1); /* max_packets > 1 spins in loop_write */
        if (rc && rc != MOSQ_ERR_NO_CONN) die("loop", rc);
        uint64_t t = now_ns();
        if (s.subscribed && !ready_at) {
            ready_at = t;
            cpu_ready = cpu_us();
            last_seen = t;
        }
        if (s.distinct >= o->count) {
            stop = "count";
            break;
        }
        long seen_now = s.distinct + s.duplicates + s.foreign;
        if (seen_now != last_count) {
            last_count = seen_now;
            last_seen = t;
        }
        if ((double)(t - start) / 1e9 > o->timeout_s) break;
        if (ready_at && s.distinct > 0 && (double)(t - last_seen) / 1e9 > o->idle_s) {
            stop = "idle";
            break;
        }
    }
    double cpu1 = cpu_us();
    mosquitto_disconnect(m);
    mosquitto_destroy(m);
    long n = s.distinct;
    qsort(s.lat_ns, (size_t)n, sizeof(int64_t), cmp_i64);
    double sum = 0;
    for (long i = 0; i < n; i++) sum += (double)s.lat_ns[i];
    printf("{\"role\": \"sub\", \"run\": %u, \"count\": %ld, \"received\": %ld, \"lost\": %ld, "
           "\"duplicates\": %ld, \"foreign\": %ld, \"stopped_by\": \"%s\", "
           "\"first_recv_ns\": %" PRIu64 ", \"last_recv_ns\": %" PRIu64 ", "
           "\"latency_ms\": {\"p50\": %.4f, \"p90\": %.4f, \"p99\": %.4f, \"p999\": %.4f, "
           "\"max\": %.4f, \"mean\": %.4f}, \"cpu_us\": %.0f, \"cpu_us_total\": %.0f, "
           "\"max_rss_kib\": %ld}\n",
           o->run, o->count, n, o->count - n, s.duplicates, s.foreign, stop, s.first_recv,
           s.last_recv, pct_ms(s.lat_ns, n, 50), pct_ms(s.lat_ns, n, 90),
           pct_ms(s.lat_ns, n, 99), pct_ms(s.lat_ns, n, 99.9), n ? (double)s.lat_ns[n - 1] / 1e6 : -1.0,
           n ? sum / (double)n / 1e6 : -1.0, cpu1 - cpu_ready, cpu1, max_rss_kib());
    free(s.seen);
    free(s.lat_ns);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) usage();
    const char *mode = argv[1];
    struct opts o = {"127.0.0.1", 0, NULL, 0, 100, 0, 1, 0.0, 1000, 120.0, 5.0};
    int c;
    optind = 2;
    while ((c = getopt(argc, argv, "H:p:t:n:s:r:q:R:w:T:I:")) != -1) {
        switch (c) {
        case 'H': o.host = optarg; break;
        case 'p': o.port = atoi(optarg); break;
        case 't': o.topic = optarg; break;
        case 'n': o.count = atol(optarg); break;
        case 's': o.size = atol(optarg); break;
        case 'r': o.run = (uint32_t)strtoul(optarg, NULL, 10); break;
        case 'q': o.qos = atoi(optarg); break;
        case 'R': o.rate = atof(optarg); break;
        case 'w': o.window = atol(optarg); break;
        case 'T': o.timeout_s = atof(optarg); break;
        case 'I': o.idle_s = atof(optarg); break;
        default: usage();
        }
    }
    if (o.port <= 0 || !o.topic || o.count <= 0 || o.size < HEADER_BYTES || o.qos < 0 ||
        o.qos > 1 || o.window < 1)
        usage();
    setvbuf(stdout, NULL, _IOLBF, 0);
    mosquitto_lib_init();
    int rc;
    if (strcmp(mode, "pub") == 0)
        rc = run_pub(&o);
    else if (strcmp(mode, "sub") == 0)
        rc = run_sub(&o);
    else
        usage();
    mosquitto_lib_cleanup();
    return rc;
}
