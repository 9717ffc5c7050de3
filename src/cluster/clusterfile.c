/* clusterfile: the cluster file, the commands derived from it, the state file, processes and probes.
 *
 * Read top to bottom: a small INI reader (ini_walk) shared by the cluster file and the state file; the cluster
 * file's schema (keys, values, then the checks across sections); command lines; the state file; processes on this
 * machine; probes (a worker's INFO, an HTTP GET). */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cluster/clusterfile.h"
#include "cluster/proto.h"
#include "core/core.h"

/* ---- INI reader ---- */

/* One callback per section header and per key; a callback writes a message without the "FILE:LINE: " prefix. */
struct ini_handler {
    int (*section)(void *ctx, int line, const char *name, const char *arg, char *err);
    int (*key)(void *ctx, int line, const char *key, const char *value, char *err);
    void *ctx;
};

static bool is_blank(char c) { return c == ' ' || c == '\t'; }

/* Parses the value part of a line (after '=' and leading blanks) into out. */
static int ini_value(const char *p, const char *end, char *out, size_t cap, char *err)
{
    size_t n = 0;
    if (p < end && *p == '"') {
        p++;
        for (;;) {
            if (p >= end) return err_set(err, ST_EFORMAT, "unterminated quoted value");
            char c = *p++;
            if (c == '"') break;
            if (c == '\\') {
                if (p >= end || (*p != '"' && *p != '\\'))
                    return err_set(err, ST_EFORMAT, "bad escape in a quoted value (only \\\" and \\\\)");
                c = *p++;
            }
            if (n + 1 >= cap) return err_set(err, ST_ERANGE, "value too long");
            out[n++] = c;
        }
        while (p < end && is_blank(*p)) p++;
        if (p < end && *p != '#' && *p != ';')
            return err_set(err, ST_EFORMAT, "text after the closing quote");
        out[n] = 0;
        return ST_OK;
    }
    const char *stop = end;
    for (const char *q = p; q < end; q++)
        if ((*q == '#' || *q == ';') && q > p && is_blank(q[-1])) {
            stop = q;
            break;
        }
    while (stop > p && is_blank(stop[-1])) stop--;
    n = (size_t)(stop - p);
    if (n >= cap) return err_set(err, ST_ERANGE, "value too long");
    memcpy(out, p, n);
    out[n] = 0;
    return ST_OK;
}

static int ini_walk(const char *text, size_t len, const char *path, const struct ini_handler *h, char *err)
{
    int rc = ST_OK, lineno = 0;
    char *value = malloc(CLUSTERFILE_LINE_MAX + 1);
    if (!value) return err_set(err, ST_ENOMEM, "out of memory");
    if (len > CLUSTERFILE_MAX_BYTES) {
        rc = err_set(err, ST_ERANGE, "%s: larger than %u bytes", path, CLUSTERFILE_MAX_BYTES);
        goto fail;
    }
    if (memchr(text, 0, len)) {
        rc = err_set(err, ST_EFORMAT, "%s: holds a NUL byte", path);
        goto fail;
    }
    size_t at = 0;
    while (at < len) {
        lineno++;
        const char *b = text + at, *nl = memchr(b, '\n', len - at);
        const char *e = nl ? nl : text + len;
        at = (size_t)(e - text) + (nl ? 1 : 0);
        if ((size_t)(e - b) > CLUSTERFILE_LINE_MAX) {
            rc = err_set(err, ST_EFORMAT, "line longer than %d bytes", CLUSTERFILE_LINE_MAX);
            goto line_fail;
        }
        if (e > b && e[-1] == '\r') e--;
        while (b < e && is_blank(*b)) b++;
        while (e > b && is_blank(e[-1])) e--;
        if (b == e || *b == '#' || *b == ';') continue;
        for (const char *q = b; q < e; q++)
            if ((unsigned char)*q < 0x20 && *q != '\t') {
                rc = err_set(err, ST_EFORMAT, "control character 0x%02x", (unsigned char)*q);
                goto line_fail;
            }
        if (*b == '[') {
            const char *close = memchr(b, ']', (size_t)(e - b));
            if (!close) {
                rc = err_set(err, ST_EFORMAT, "section header without ']'");
                goto line_fail;
            }
            const char *rest = close + 1;
            while (rest < e && is_blank(*rest)) rest++;
            if (rest < e && *rest != '#' && *rest != ';') {
                rc = err_set(err, ST_EFORMAT, "text after the section header");
                goto line_fail;
            }
            char name[64], arg[256];
            const char *p = b + 1;
            while (p < close && is_blank(*p)) p++;
            const char *ne = p;
            while (ne < close && !is_blank(*ne)) ne++;
            if (ne == p || (size_t)(ne - p) >= sizeof(name)) {
                rc = err_set(err, ST_EFORMAT, "bad section header");
                goto line_fail;
            }
            memcpy(name, p, (size_t)(ne - p));
            name[ne - p] = 0;
            p = ne;
            while (p < close && is_blank(*p)) p++;
            const char *ae = close;
            while (ae > p && is_blank(ae[-1])) ae--;
            if ((size_t)(ae - p) >= sizeof(arg)) {
                rc = err_set(err, ST_EFORMAT, "section name too long");
                goto line_fail;
            }
            memcpy(arg, p, (size_t)(ae - p));
            arg[ae - p] = 0;
            if ((rc = h->section(h->ctx, lineno, name, arg, err)) < 0) goto line_fail;
            continue;
        }
        const char *eq = memchr(b, '=', (size_t)(e - b));
        if (!eq) {
            rc = err_set(err, ST_EFORMAT, "expected \"key = value\" or a [section]");
            goto line_fail;
        }
        const char *ke = eq;
        while (ke > b && is_blank(ke[-1])) ke--;
        char key[64];
        if (ke == b || (size_t)(ke - b) >= sizeof(key)) {
            rc = err_set(err, ST_EFORMAT, "missing or overlong key before '='");
            goto line_fail;
        }
        memcpy(key, b, (size_t)(ke - b));
        key[ke - b] = 0;
        for (const char *q = key; *q; q++)
            if (!(islower((unsigned char)*q) || isdigit((unsigned char)*q) || *q == '_')) {
                rc = err_set(err, ST_EFORMAT, "bad key \"%s\" (lower-case letters, digits and '_')", key);
                goto line_fail;
            }
        const char *v = eq + 1;
        while (v < e && is_blank(*v)) v++;
        if ((rc = ini_value(v, e, value, CLUSTERFILE_LINE_MAX + 1, err)) < 0) goto line_fail;
        if ((rc = h->key(h->ctx, lineno, key, value, err)) < 0) goto line_fail;
    }
    free(value);
    return ST_OK;
line_fail:
    err_prefix(err, rc, "%s:%d", path, lineno);
fail:
    free(value);
    return rc;
}

/* ---- values ---- */

static bool name_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > CLUSTERFILE_NAME_MAX) return false;
    for (const char *p = s; *p; p++)
        if (!(isalnum((unsigned char)*p) || *p == '.' || *p == '_' || *p == '-')) return false;
    return true;
}

static int copy_value(char *out, size_t cap, const char *key, const char *v, char *err)
{
    if (!v[0]) return err_set(err, ST_EINVAL, "%s: empty value", key);
    if (strlen(v) >= cap) return err_set(err, ST_ERANGE, "%s: longer than %zu bytes", key, cap - 1);
    snprintf(out, cap, "%s", v);
    return ST_OK;
}

static int parse_name(char *out, const char *key, const char *v, char *err)
{
    if (!name_ok(v))
        return err_set(err, ST_EINVAL, "%s: \"%s\" is not a name (1..%d of A-Z a-z 0-9 . _ -)", key, v,
                       CLUSTERFILE_NAME_MAX);
    snprintf(out, CLUSTERFILE_NAME_MAX + 1, "%s", v);
    return ST_OK;
}

static int parse_int(int *out, const char *key, const char *v, long lo, long hi, char *err)
{
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || end == v || *end || x < lo || x > hi)
        return err_set(err, ST_EINVAL, "%s: expected an integer in [%ld, %ld], got \"%s\"", key, lo, hi, v);
    *out = (int)x;
    return ST_OK;
}

static int parse_bool(bool *out, const char *key, const char *v, char *err)
{
    static const char *yes[] = {"yes", "true", "on", "1"}, *no[] = {"no", "false", "off", "0"};
    for (size_t i = 0; i < ST_ARRAY_LEN(yes); i++) {
        if (!strcmp(v, yes[i])) {
            *out = true;
            return ST_OK;
        }
        if (!strcmp(v, no[i])) {
            *out = false;
            return ST_OK;
        }
    }
    return err_set(err, ST_EINVAL, "%s: expected yes or no, got \"%s\"", key, v);
}

/* "123", "64K", "512M", "8G", "1T" (binary units, an optional trailing B). */
static int parse_size(uint64_t *out, const char *key, const char *v, char *err)
{
    char *end;
    errno = 0;
    unsigned long long x = strtoull(v, &end, 10);
    uint64_t mul = 1;
    switch (*end) {
    case 'K': case 'k': mul = 1ull << 10; end++; break;
    case 'M': case 'm': mul = 1ull << 20; end++; break;
    case 'G': case 'g': mul = 1ull << 30; end++; break;
    case 'T': case 't': mul = 1ull << 40; end++; break;
    default: break;
    }
    if (*end == 'B' || *end == 'b') end++;
    if (errno || end == v || *end || !isdigit((unsigned char)v[0]) || x == 0 || x > UINT64_MAX / mul)
        return err_set(err, ST_EINVAL, "%s: expected a size like 512M or 8G, got \"%s\"", key, v);
    *out = (uint64_t)x * mul;
    return ST_OK;
}

static int parse_path(char *out, const char *key, const char *v, char *err)
{
    return copy_value(out, CLUSTERFILE_PATH_MAX, key, v, err);
}

static int parse_host(char *out, size_t cap, const char *key, const char *v, char *err)
{
    if (!v[0]) return err_set(err, ST_EINVAL, "%s: empty host", key);
    if (strlen(v) >= cap) return err_set(err, ST_ERANGE, "%s: host too long", key);
    for (const char *p = v; *p; p++)
        if (!(isalnum((unsigned char)*p) || *p == '.' || *p == '-' || *p == ':' || *p == '_' || *p == '%'))
            return err_set(err, ST_EINVAL, "%s: \"%s\" is not a host name or IP address", key, v);
    snprintf(out, cap, "%s", v);
    return ST_OK;
}

/* HOST:PORT or [IPV6]:PORT; port 1..65535. */
static int parse_address(char *host, size_t cap, int *port, const char *key, const char *v, char *err)
{
    const char *colon = strrchr(v, ':');
    if (!colon) return err_set(err, ST_EINVAL, "%s: expected HOST:PORT, got \"%s\"", key, v);
    char h[256];
    size_t hl = (size_t)(colon - v);
    const char *hs = v;
    if (hl >= 2 && v[0] == '[' && colon[-1] == ']') {
        hs++;
        hl -= 2;
    }
    if (hl >= sizeof(h)) return err_set(err, ST_ERANGE, "%s: host too long", key);
    memcpy(h, hs, hl);
    h[hl] = 0;
    int rc;
    if ((rc = parse_host(host, cap, key, h, err)) < 0) return rc;
    return parse_int(port, key, colon + 1, 1, 65535, err);
}

/* [user@]host for ssh: never an option (no leading '-'), no shell syntax. */
static int parse_ssh_target(char *out, size_t cap, const char *key, const char *v, char *err)
{
    if (!v[0] || v[0] == '-' || strlen(v) >= cap)
        return err_set(err, ST_EINVAL, "%s: \"%s\" is not an ssh target ([user@]host, not starting with '-')", key, v);
    for (const char *p = v; *p; p++)
        if (!(isalnum((unsigned char)*p) || strchr("._-@:%[]", *p)))
            return err_set(err, ST_EINVAL, "%s: \"%s\" is not an ssh target ([user@]host)", key, v);
    snprintf(out, cap, "%s", v);
    return ST_OK;
}

static int parse_device(char *out, size_t cap, const char *key, const char *v, char *err)
{
    enum backend_kind kind;
    int dev;
    if (backend_parse_device(v, &kind, &dev, NULL) < 0 || strlen(v) >= cap)
        return err_set(err, ST_EINVAL, "%s: unknown device \"%s\" (cpu, cuda or cuda:N)", key, v);
    snprintf(out, cap, "%s", v);
    return ST_OK;
}

/* One inclusive layer range "a-b". */
static int parse_range(const char *s, const char *end, int *a, int *b)
{
    char buf[32];
    size_t n = (size_t)(end - s);
    if (n == 0 || n >= sizeof(buf)) return -1;
    memcpy(buf, s, n);
    buf[n] = 0;
    char *p = buf, *e;
    while (is_blank(*p)) p++;
    if (!isdigit((unsigned char)*p)) return -1;
    errno = 0;
    long x = strtol(p, &e, 10);
    while (is_blank(*e)) e++;
    if (errno || *e != '-' || x > 1000000) return -1;
    p = e + 1;
    while (is_blank(*p)) p++;
    if (!isdigit((unsigned char)*p)) return -1;
    long y = strtol(p, &e, 10);
    while (is_blank(*e)) e++;
    if (errno || *e || y < x || y > 1000000) return -1;
    *a = (int)x;
    *b = (int)y;
    return 0;
}

/* Checks a whole placement: n ranges tiling [0, last] in order. */
static int check_layers(const char *spec, int n_expected, const char *what, char *err)
{
    int n = 0, next = 0;
    const char *p = spec;
    for (;;) {
        const char *comma = strchr(p, ',');
        const char *end = comma ? comma : p + strlen(p);
        int a, b;
        if (parse_range(p, end, &a, &b) < 0)
            return err_set(err, ST_EINVAL, "%s: expected inclusive ranges like 0-3,4-7, got \"%s\"", what, spec);
        if (a != next)
            return err_set(err, ST_EINVAL, "%s: range %d-%d should start at layer %d (ranges tile the layers in order)",
                           what, a, b, next);
        next = b + 1;
        n++;
        if (!comma) break;
        p = comma + 1;
    }
    if (n != n_expected)
        return err_set(err, ST_EINVAL, "%s: %d range%s for %d worker%s", what, n, n == 1 ? "" : "s", n_expected,
                       n_expected == 1 ? "" : "s");
    return ST_OK;
}

static bool is_loopback(const char *host)
{
    return !strcmp(host, "localhost") || !strncmp(host, "127.", 4) || !strcmp(host, "::1");
}

/* ---- the cluster file ---- */

enum { SEC_NONE, SEC_CLUSTER, SEC_NODE };

static const char *const cluster_keys[] = {
    "name", "model", "model_name", "secret_file", "layers", "api_host", "api_port", "api_key_file", "parallel",
    "ctx", "device", "send_weights", "state_dir", "remote_dir", "strata", "log_level", "start_timeout",
    "stop_timeout",
};
static const char *const node_keys[] = {
    "address", "host", "port", "listen", "ssh", "netns", "local", "model", "device", "threads", "max_memory",
    "cache_dir", "strata", "layers", "api_port", "worker", "coordinator", "managed",
};
#define N_NODE_KEYS ST_ARRAY_LEN(node_keys)

struct node_extra {
    uint32_t seen;           /* bit per node_keys[] index */
    int line[N_NODE_KEYS];   /* where each key was set */
    bool local_set, local;   /* local = yes|no as written */
};

struct cf_parse {
    struct clusterfile *cf;
    int section;
    int cluster_line;
    uint32_t cluster_seen;
    int cluster_key_line[ST_ARRAY_LEN(cluster_keys)];
    struct node_extra *extra; /* [CLUSTERFILE_MAX_NODES] */
};

static int key_index(const char *const *keys, size_t n, const char *key)
{
    for (size_t i = 0; i < n; i++)
        if (!strcmp(keys[i], key)) return (int)i;
    return -1;
}

static int unknown_key(const char *const *keys, size_t n, const char *key, const char *where, char *err)
{
    char list[512] = "";
    size_t at = 0;
    for (size_t i = 0; i < n && at < sizeof(list); i++)
        at += (size_t)snprintf(list + at, sizeof(list) - at, "%s%s", i ? ", " : "", keys[i]);
    return err_set(err, ST_EINVAL, "unknown key \"%s\" in %s (known: %s)", key, where, list);
}

static int cf_section(void *ctx, int line, const char *name, const char *arg, char *err)
{
    struct cf_parse *ps = ctx;
    struct clusterfile *cf = ps->cf;
    if (!strcmp(name, "cluster")) {
        if (arg[0]) return err_set(err, ST_EINVAL, "[cluster] takes no name");
        if (ps->cluster_line)
            return err_set(err, ST_EINVAL, "a second [cluster] section (the first is at line %d)", ps->cluster_line);
        ps->cluster_line = line;
        ps->section = SEC_CLUSTER;
        return ST_OK;
    }
    if (!strcmp(name, "node")) {
        if (!arg[0]) return err_set(err, ST_EINVAL, "[node] needs a name: [node NAME]");
        if (!name_ok(arg))
            return err_set(err, ST_EINVAL, "node name \"%s\": use 1..%d of A-Z a-z 0-9 . _ -", arg,
                           CLUSTERFILE_NAME_MAX);
        for (int i = 0; i < cf->n_nodes; i++)
            if (!strcmp(cf->nodes[i].name, arg))
                return err_set(err, ST_EINVAL, "node \"%s\" is defined twice (first at line %d)", arg,
                               cf->nodes[i].line);
        if (cf->n_nodes == CLUSTERFILE_MAX_NODES)
            return err_set(err, ST_ERANGE, "more than %d nodes", CLUSTERFILE_MAX_NODES);
        struct clusterfile_node *n = &cf->nodes[cf->n_nodes++];
        memset(n, 0, sizeof(*n));
        snprintf(n->name, sizeof(n->name), "%s", arg);
        n->line = line;
        n->worker = true;
        n->managed = true;
        n->coordinator = CLUSTERFILE_COORD_NO;
        ps->section = SEC_NODE;
        return ST_OK;
    }
    return err_set(err, ST_EINVAL, "unknown section [%s] (expected [cluster] or [node NAME])", name);
}

static int cf_cluster_key(struct cf_parse *ps, int line, const char *key, const char *v, char *err)
{
    struct clusterfile *cf = ps->cf;
    int k = key_index(cluster_keys, ST_ARRAY_LEN(cluster_keys), key);
    if (k < 0) return unknown_key(cluster_keys, ST_ARRAY_LEN(cluster_keys), key, "[cluster]", err);
    if (ps->cluster_seen & (1u << k))
        return err_set(err, ST_EINVAL, "%s is set twice in [cluster] (first at line %d)", key, ps->cluster_key_line[k]);
    ps->cluster_seen |= 1u << k;
    ps->cluster_key_line[k] = line;
    if (!strcmp(key, "name")) return parse_name(cf->name, key, v, err);
    if (!strcmp(key, "model")) return parse_path(cf->model, key, v, err);
    if (!strcmp(key, "model_name")) return copy_value(cf->model_name, sizeof(cf->model_name), key, v, err);
    if (!strcmp(key, "secret_file")) return parse_path(cf->secret_file, key, v, err);
    if (!strcmp(key, "layers")) {
        if (!strcmp(v, "auto")) {
            cf->layers[0] = 0;
            return ST_OK;
        }
        return copy_value(cf->layers, sizeof(cf->layers), key, v, err); /* checked once the workers are known */
    }
    if (!strcmp(key, "api_host")) return parse_host(cf->api_host, sizeof(cf->api_host), key, v, err);
    if (!strcmp(key, "api_port")) return parse_int(&cf->api_port, key, v, 1, 65535, err);
    if (!strcmp(key, "api_key_file")) return parse_path(cf->api_key_file, key, v, err);
    if (!strcmp(key, "parallel")) return parse_int(&cf->parallel, key, v, 1, 4096, err);
    if (!strcmp(key, "ctx")) return parse_int(&cf->ctx, key, v, 1, 1 << 22, err);
    if (!strcmp(key, "device")) return parse_device(cf->device, sizeof(cf->device), key, v, err);
    if (!strcmp(key, "send_weights")) return parse_bool(&cf->send_weights, key, v, err);
    if (!strcmp(key, "state_dir")) return parse_path(cf->state_dir, key, v, err);
    if (!strcmp(key, "remote_dir")) return parse_path(cf->remote_dir, key, v, err);
    if (!strcmp(key, "strata")) return parse_path(cf->strata, key, v, err);
    if (!strcmp(key, "log_level")) {
        if (log_level_parse(v) < 0)
            return err_set(err, ST_EINVAL, "log_level: expected debug, info, warn, error or off, got \"%s\"", v);
        snprintf(cf->log_level, sizeof(cf->log_level), "%s", v);
        return ST_OK;
    }
    if (!strcmp(key, "start_timeout")) return parse_int(&cf->start_timeout_s, key, v, 1, 86400, err);
    if (!strcmp(key, "stop_timeout")) return parse_int(&cf->stop_timeout_s, key, v, 1, 3600, err);
    ST_ASSERT(!"a key in cluster_keys without a parser");
    return ST_EINVAL;
}

static int cf_node_key(struct cf_parse *ps, int line, const char *key, const char *v, char *err)
{
    struct clusterfile *cf = ps->cf;
    struct clusterfile_node *n = &cf->nodes[cf->n_nodes - 1];
    struct node_extra *x = &ps->extra[cf->n_nodes - 1];
    int k = key_index(node_keys, N_NODE_KEYS, key);
    char where[96];
    snprintf(where, sizeof(where), "[node %s]", n->name);
    if (k < 0) return unknown_key(node_keys, N_NODE_KEYS, key, where, err);
    if (x->seen & (1u << k))
        return err_set(err, ST_EINVAL, "%s is set twice in %s (first at line %d)", key, where, x->line[k]);
    x->seen |= 1u << k;
    x->line[k] = line;
    if (!strcmp(key, "address")) return parse_address(n->host, sizeof(n->host), &n->port, key, v, err);
    if (!strcmp(key, "host")) return parse_host(n->host, sizeof(n->host), key, v, err);
    if (!strcmp(key, "port")) return parse_int(&n->port, key, v, 1, 65535, err);
    if (!strcmp(key, "listen"))
        return parse_address(n->listen_host, sizeof(n->listen_host), &n->listen_port, key, v, err);
    if (!strcmp(key, "ssh")) {
        n->launch = CLUSTERFILE_LAUNCH_SSH;
        return parse_ssh_target(n->target, sizeof(n->target), key, v, err);
    }
    if (!strcmp(key, "netns")) {
        n->launch = CLUSTERFILE_LAUNCH_NETNS;
        return parse_name(n->target, key, v, err);
    }
    if (!strcmp(key, "local")) {
        x->local_set = true;
        return parse_bool(&x->local, key, v, err);
    }
    if (!strcmp(key, "model")) return parse_path(n->model, key, v, err);
    if (!strcmp(key, "device")) return parse_device(n->device, sizeof(n->device), key, v, err);
    if (!strcmp(key, "threads")) return parse_int(&n->threads, key, v, 1, 4096, err);
    if (!strcmp(key, "max_memory")) return parse_size(&n->max_memory_bytes, key, v, err);
    if (!strcmp(key, "cache_dir")) return parse_path(n->cache_dir, key, v, err);
    if (!strcmp(key, "strata")) return parse_path(n->strata, key, v, err);
    if (!strcmp(key, "layers")) {
        const char *end = v + strlen(v);
        int a, b;
        if (parse_range(v, end, &a, &b) < 0 || strlen(v) >= sizeof(n->layers))
            return err_set(err, ST_EINVAL, "layers: expected an inclusive range like 0-3, got \"%s\"", v);
        snprintf(n->layers, sizeof(n->layers), "%d-%d", a, b);
        return ST_OK;
    }
    if (!strcmp(key, "api_port")) return parse_int(&n->api_port, key, v, 1, 65535, err);
    if (!strcmp(key, "worker")) return parse_bool(&n->worker, key, v, err);
    if (!strcmp(key, "managed")) return parse_bool(&n->managed, key, v, err);
    if (!strcmp(key, "coordinator")) {
        if (!strcmp(v, "yes") || !strcmp(v, "true")) n->coordinator = CLUSTERFILE_COORD_YES;
        else if (!strcmp(v, "candidate")) n->coordinator = CLUSTERFILE_COORD_CANDIDATE;
        else if (!strcmp(v, "no") || !strcmp(v, "false")) n->coordinator = CLUSTERFILE_COORD_NO;
        else return err_set(err, ST_EINVAL, "coordinator: expected yes, candidate or no, got \"%s\"", v);
        return ST_OK;
    }
    ST_ASSERT(!"a key in node_keys without a parser");
    return ST_EINVAL;
}

static int cf_key(void *ctx, int line, const char *key, const char *value, char *err)
{
    struct cf_parse *ps = ctx;
    if (ps->section == SEC_CLUSTER) return cf_cluster_key(ps, line, key, value, err);
    if (ps->section == SEC_NODE) return cf_node_key(ps, line, key, value, err);
    return err_set(err, ST_EINVAL, "\"%s\" outside a section: start with [cluster] or [node NAME]", key);
}

static int node_key_line(const struct cf_parse *ps, int node, const char *key)
{
    int k = key_index(node_keys, N_NODE_KEYS, key);
    const struct node_extra *x = &ps->extra[node];
    return k >= 0 && (x->seen & (1u << k)) ? x->line[k] : ps->cf->nodes[node].line;
}

static bool node_has(const struct cf_parse *ps, int node, const char *key)
{
    int k = key_index(node_keys, N_NODE_KEYS, key);
    return k >= 0 && (ps->extra[node].seen & (1u << k));
}

/* Checks across keys and sections, once everything is read; messages name the line to fix. */
static int cf_finish(struct cf_parse *ps, char *err)
{
    struct clusterfile *cf = ps->cf;
    const char *path = cf->path;
    if (cf->n_nodes == 0) return err_set(err, ST_EINVAL, "%s: no [node NAME] sections", path);
    if (!cf->name[0]) {
        const char *base = strrchr(path, '/');
        base = base ? base + 1 : path;
        char nm[CLUSTERFILE_NAME_MAX + 1];
        size_t l = strcspn(base, ".");
        if (l == 0 || l > CLUSTERFILE_NAME_MAX) l = 0;
        memcpy(nm, base, l);
        nm[l] = 0;
        if (!name_ok(nm))
            return err_set(err, ST_EINVAL, "%s: set name in [cluster] (the file name \"%s\" is not a usable name)",
                           path, base);
        snprintf(cf->name, sizeof(cf->name), "%s", nm);
    }
    if (!cf->api_port) cf->api_port = CLUSTER_DEFAULT_API_PORT;
    if (!cf->start_timeout_s) cf->start_timeout_s = 600;
    if (!cf->stop_timeout_s) cf->stop_timeout_s = 30;
    if (!cf->strata[0]) snprintf(cf->strata, sizeof(cf->strata), "strata");
    int n_coord = 0, n_workers = 0, n_layers_given = 0, first_coord = 0;
    for (int i = 0; i < cf->n_nodes; i++) {
        struct clusterfile_node *n = &cf->nodes[i];
        const struct node_extra *x = &ps->extra[i];
        if (node_has(ps, i, "address") && (node_has(ps, i, "host") || node_has(ps, i, "port")))
            return err_set(err, ST_EINVAL, "%s:%d: node %s: give either address or host/port, not both", path,
                           node_key_line(ps, i, "address"), n->name);
        if (!n->host[0])
            return err_set(err, ST_EINVAL, "%s:%d: node %s has no address (address = HOST:PORT)", path, n->line,
                           n->name);
        if (!n->port) n->port = CLUSTER_DEFAULT_PORT;
        if (!n->listen_host[0]) {
            snprintf(n->listen_host, sizeof(n->listen_host), "%s", n->host);
            n->listen_port = n->port;
        }
        int kinds = node_has(ps, i, "ssh") + node_has(ps, i, "netns") + (x->local_set && x->local);
        if (kinds > 1)
            return err_set(err, ST_EINVAL, "%s:%d: node %s: ssh, netns and local = yes exclude each other", path,
                           n->line, n->name);
        if (kinds == 0) {
            if (x->local_set && !x->local)
                return err_set(err, ST_EINVAL, "%s:%d: node %s: local = no, but neither ssh nor netns is set", path,
                               node_key_line(ps, i, "local"), n->name);
            if (!x->local_set && !is_loopback(n->host) && (n->managed || n->coordinator != CLUSTERFILE_COORD_NO))
                return err_set(err, ST_EINVAL,
                               "%s:%d: node %s (%s): say how to start it: ssh = [USER@]HOST for another machine, "
                               "netns = NS for a network namespace here, or local = yes",
                               path, n->line, n->name, n->host);
            n->launch = CLUSTERFILE_LAUNCH_LOCAL;
        }
        if (!n->worker && n->coordinator == CLUSTERFILE_COORD_NO)
            return err_set(err, ST_EINVAL, "%s:%d: node %s does nothing (worker = no and coordinator = no)", path,
                           n->line, n->name);
        if (!n->worker && !n->managed)
            return err_set(err, ST_EINVAL, "%s:%d: node %s: managed = no is about its worker, but worker = no", path,
                           node_key_line(ps, i, "managed"), n->name);
        if (!n->worker && n->layers[0])
            return err_set(err, ST_EINVAL, "%s:%d: node %s has layers but worker = no", path,
                           node_key_line(ps, i, "layers"), n->name);
        if (n->worker) {
            n_workers++;
            if (n->layers[0]) n_layers_given++;
            for (int j = 0; j < i; j++) {
                const struct clusterfile_node *o = &cf->nodes[j];
                if (o->worker && !strcmp(o->host, n->host) && o->port == n->port)
                    return err_set(err, ST_EINVAL, "%s:%d: nodes %s and %s have the same address %s:%d", path,
                                   n->line, o->name, n->name, n->host, n->port);
            }
        }
        if (n->coordinator == CLUSTERFILE_COORD_YES) {
            if (n_coord++)
                return err_set(err, ST_EINVAL, "%s:%d: node %s: coordinator = yes is already node %s (use candidate "
                               "for the others)", path, node_key_line(ps, i, "coordinator"), n->name,
                               cf->nodes[first_coord].name);
            first_coord = i;
        }
        if (n->coordinator != CLUSTERFILE_COORD_NO) {
            if (!n->model[0] && !cf->model[0])
                return err_set(err, ST_EINVAL, "%s:%d: node %s may be the coordinator but has no model directory: "
                               "set model in [cluster] or in [node %s]", path, n->line, n->name, n->name);
            int api_port = n->api_port ? n->api_port : cf->api_port;
            for (int j = 0; j < cf->n_nodes; j++) {
                const struct clusterfile_node *o = &cf->nodes[j];
                if (o->worker && !strcmp(o->host, n->host) && o->port == api_port)
                    return err_set(err, ST_EINVAL, "%s:%d: node %s: API port %d is node %s's worker port", path,
                                   n->line, n->name, api_port, o->name);
            }
        }
    }
    if (n_coord == 0)
        return err_set(err, ST_EINVAL, "%s: no node has coordinator = yes (say where the coordinator runs)", path);
    if (n_workers == 0) return err_set(err, ST_EINVAL, "%s: no node runs a worker", path);
    if (n_workers > CLUSTER_MAX_STAGES)
        return err_set(err, ST_ERANGE, "%s: %d workers (at most %d)", path, n_workers, CLUSTER_MAX_STAGES);
    int k_layers = key_index(cluster_keys, ST_ARRAY_LEN(cluster_keys), "layers");
    if (n_layers_given) {
        if (cf->layers[0])
            return err_set(err, ST_EINVAL, "%s:%d: layers is set in [cluster] and in nodes: use one or the other",
                           path, ps->cluster_key_line[k_layers]);
        if (n_layers_given != n_workers) {
            for (int i = 0; i < cf->n_nodes; i++)
                if (cf->nodes[i].worker && !cf->nodes[i].layers[0])
                    return err_set(err, ST_EINVAL, "%s:%d: node %s has no layers, but other nodes do: give every "
                                   "worker its range, or none", path, cf->nodes[i].line, cf->nodes[i].name);
        }
        size_t at = 0;
        for (int i = 0; i < cf->n_nodes; i++)
            if (cf->nodes[i].worker)
                at += (size_t)snprintf(cf->layers + at, sizeof(cf->layers) - at, "%s%s", at ? "," : "",
                                       cf->nodes[i].layers);
        if (at >= sizeof(cf->layers)) return err_set(err, ST_ERANGE, "%s: the layer ranges are too long", path);
        int rc = check_layers(cf->layers, n_workers, "layers of the nodes", err);
        if (rc < 0) {
            cf->layers[0] = 0;
            return err_prefix(err, rc, "%s", path);
        }
    } else if (cf->layers[0]) {
        int rc = check_layers(cf->layers, n_workers, "layers", err);
        if (rc < 0) return err_prefix(err, rc, "%s:%d", path, ps->cluster_key_line[k_layers]);
    }
    return ST_OK;
}

int clusterfile_parse(struct clusterfile *cf, const char *text, size_t len, const char *path, char *err)
{
    int rc;
    memset(cf, 0, sizeof(*cf));
    struct cf_parse ps = {.cf = cf};
    if (!path || !path[0]) path = "cluster file";
    if (strlen(path) >= sizeof(cf->path)) return err_set(err, ST_ERANGE, "cluster file path too long");
    snprintf(cf->path, sizeof(cf->path), "%s", path);
    const char *slash = strrchr(path, '/');
    if (!slash) snprintf(cf->dir, sizeof(cf->dir), ".");
    else if (slash == path) snprintf(cf->dir, sizeof(cf->dir), "/");
    else snprintf(cf->dir, sizeof(cf->dir), "%.*s", (int)(slash - path), path);
    cf->nodes = calloc(CLUSTERFILE_MAX_NODES, sizeof(*cf->nodes));
    ps.extra = calloc(CLUSTERFILE_MAX_NODES, sizeof(*ps.extra));
    if (!cf->nodes || !ps.extra) {
        rc = err_set(err, ST_ENOMEM, "out of memory");
        goto fail;
    }
    struct ini_handler h = {.section = cf_section, .key = cf_key, .ctx = &ps};
    if ((rc = ini_walk(text, len, path, &h, err)) < 0) goto fail;
    if ((rc = cf_finish(&ps, err)) < 0) goto fail;
    free(ps.extra);
    return ST_OK;
fail:
    free(ps.extra);
    clusterfile_free(cf);
    return rc;
}

int clusterfile_load(struct clusterfile *cf, const char *path, char *err)
{
    memset(cf, 0, sizeof(*cf));
    char *text = NULL;
    size_t len = 0;
    int rc = file_read_all(path, &text, &len, CLUSTERFILE_MAX_BYTES, err);
    if (rc < 0) return err_prefix(err, rc, "cluster file %s", path);
    rc = clusterfile_parse(cf, text, len, path, err);
    free(text);
    return rc;
}

void clusterfile_free(struct clusterfile *cf)
{
    if (!cf) return;
    free(cf->nodes);
    cf->nodes = NULL;
    cf->n_nodes = 0;
}

const struct clusterfile_node *clusterfile_node_find(const struct clusterfile *cf, const char *name)
{
    for (int i = 0; i < cf->n_nodes; i++)
        if (!strcmp(cf->nodes[i].name, name)) return &cf->nodes[i];
    return NULL;
}

const struct clusterfile_node *clusterfile_coordinator(const struct clusterfile *cf)
{
    for (int i = 0; i < cf->n_nodes; i++)
        if (cf->nodes[i].coordinator == CLUSTERFILE_COORD_YES) return &cf->nodes[i];
    return NULL;
}

int clusterfile_n_workers(const struct clusterfile *cf)
{
    int n = 0;
    for (int i = 0; i < cf->n_nodes; i++) n += cf->nodes[i].worker;
    return n;
}

int clusterfile_state_dir(const struct clusterfile *cf, char *out, size_t cap, char *err)
{
    int n;
    const char *xdg = getenv("XDG_STATE_HOME"), *home = getenv("HOME");
    if (cf->state_dir[0]) {
        char tmp[CLUSTERFILE_PATH_MAX * 2];
        if (cf->state_dir[0] == '/') n = snprintf(out, cap, "%s", cf->state_dir);
        else {
            snprintf(tmp, sizeof(tmp), "%s/%s", cf->dir, cf->state_dir);
            n = snprintf(out, cap, "%s", tmp);
        }
    } else if (xdg && xdg[0] == '/') {
        n = snprintf(out, cap, "%s/strata/%s", xdg, cf->name);
    } else if (home && home[0] == '/') {
        n = snprintf(out, cap, "%s/.local/state/strata/%s", home, cf->name);
    } else {
        n = snprintf(out, cap, "/tmp/strata-cluster-%s-%u", cf->name, (unsigned)getuid());
    }
    if (n < 0 || (size_t)n >= cap) return err_set(err, ST_ERANGE, "state directory path too long");
    for (const char *p = out; *p; p++)
        if ((unsigned char)*p < 0x20) return err_set(err, ST_EINVAL, "state directory path has a control character");
    return ST_OK;
}

int clusterfile_node_path(const struct clusterfile *cf, const struct clusterfile_node *n, const char *path,
                          char *out, size_t cap, char *err)
{
    int w;
    if (!path[0] || path[0] == '/' || n->launch == CLUSTERFILE_LAUNCH_SSH) w = snprintf(out, cap, "%s", path);
    else if (!strcmp(cf->dir, ".")) w = snprintf(out, cap, "%s", path);
    else w = snprintf(out, cap, "%s/%s", cf->dir, path);
    if (w < 0 || (size_t)w >= cap) return err_set(err, ST_ERANGE, "path %s too long", path);
    return ST_OK;
}

void clusterfile_api_address(const struct clusterfile *cf, const struct clusterfile_node *n, char *host,
                             size_t host_cap, int *port)
{
    const char *h = cf->api_host;
    if (!h[0] || !strcmp(h, "0.0.0.0") || !strcmp(h, "::")) h = n->host;
    snprintf(host, host_cap, "%s", h);
    *port = n->api_port ? n->api_port : cf->api_port;
}

const char *clusterfile_launch_name(enum clusterfile_launch l)
{
    switch (l) {
    case CLUSTERFILE_LAUNCH_LOCAL: return "local";
    case CLUSTERFILE_LAUNCH_NETNS: return "netns";
    case CLUSTERFILE_LAUNCH_SSH: return "ssh";
    default: return "?";
    }
}

int clusterfile_launch_parse(const char *s, enum clusterfile_launch *out)
{
    for (int i = 0; i < CLUSTERFILE_LAUNCH_COUNT; i++)
        if (!strcmp(s, clusterfile_launch_name((enum clusterfile_launch)i))) {
            *out = (enum clusterfile_launch)i;
            return ST_OK;
        }
    return ST_EINVAL;
}

/* ---- command lines ---- */

void cluster_cmd_init(struct cluster_cmd *c) { memset(c, 0, sizeof(*c)); }

void cluster_cmd_free(struct cluster_cmd *c)
{
    for (int i = 0; i < c->argc; i++) free(c->argv[i]);
    memset(c, 0, sizeof(*c));
}

void cluster_cmd_add(struct cluster_cmd *c, const char *word)
{
    if (c->failed) return;
    if (c->argc >= CLUSTER_CMD_MAX_ARGS) {
        c->failed = true;
        return;
    }
    char *s = st_strdup(word);
    if (!s) {
        c->failed = true;
        return;
    }
    c->argv[c->argc++] = s;
    c->argv[c->argc] = NULL;
}

void cluster_cmd_addf(struct cluster_cmd *c, const char *fmt, ...)
{
    char buf[CLUSTERFILE_LINE_MAX];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof(buf)) {
        c->failed = true;
        return;
    }
    cluster_cmd_add(c, buf);
}

static bool shell_safe(char ch)
{
    return isalnum((unsigned char)ch) || strchr("_-./=:,+@%", ch) != NULL;
}

int cluster_shell_quote(const char *s, char *out, size_t cap)
{
    bool safe = s[0] != 0;
    for (const char *p = s; *p; p++)
        if (!shell_safe(*p)) safe = false;
    size_t n = 0;
#define PUT(ch) do { if (n + 1 >= cap) return ST_ERANGE; out[n++] = (ch); } while (0)
    if (safe) {
        for (const char *p = s; *p; p++) PUT(*p);
    } else {
        PUT('\'');
        for (const char *p = s; *p; p++) {
            if (*p == '\'') {
                PUT('\'');
                PUT('\\');
                PUT('\'');
                PUT('\'');
            } else {
                PUT(*p);
            }
        }
        PUT('\'');
    }
#undef PUT
    if (cap == 0) return ST_ERANGE;
    out[n] = 0;
    return ST_OK;
}

/* The words of c quoted and joined into out; ST_ERANGE when it does not fit. */
static int cmd_join(const struct cluster_cmd *c, int from, char *out, size_t cap)
{
    size_t at = 0;
    char *q = malloc(CLUSTERFILE_LINE_MAX * 4 + 8);
    if (!q) return ST_ENOMEM;
    if (cap) out[0] = 0;
    for (int i = from; i < c->argc; i++) {
        if (cluster_shell_quote(c->argv[i], q, CLUSTERFILE_LINE_MAX * 4 + 8) < 0) {
            free(q);
            return ST_ERANGE;
        }
        int w = snprintf(out + at, cap - at, "%s%s", i > from ? " " : "", q);
        if (w < 0 || (size_t)w >= cap - at) {
            free(q);
            return ST_ERANGE;
        }
        at += (size_t)w;
    }
    free(q);
    return ST_OK;
}

void cluster_cmd_format(const struct cluster_cmd *c, char *out, size_t cap)
{
    if (cap == 0) return;
    if (cmd_join(c, 0, out, cap) < 0 && cap > 4) snprintf(out + cap - 4, 4, "...");
}

static int cmd_check(const struct cluster_cmd *c, char *err)
{
    return c->failed ? err_set(err, ST_ENOMEM, "command line too long or out of memory") : ST_OK;
}

static const char *node_strata(const struct clusterfile *cf, const struct clusterfile_node *n, const char *strata)
{
    if (n->strata[0]) return n->strata;
    if (n->launch == CLUSTERFILE_LAUNCH_SSH) return cf->strata;
    return strata;
}

int clusterfile_worker_cmd(const struct clusterfile *cf, const struct clusterfile_node *n, const char *strata,
                           struct cluster_cmd *out, char *err)
{
    int rc;
    char p[CLUSTERFILE_PATH_MAX * 2 + 2];
    cluster_cmd_init(out);
    if (!n->worker) return err_set(err, ST_EINVAL, "node %s runs no worker", n->name);
    cluster_cmd_add(out, node_strata(cf, n, strata));
    cluster_cmd_add(out, "worker");
    cluster_cmd_add(out, "--listen");
    cluster_cmd_addf(out, "%s:%d", n->listen_host, n->listen_port);
    cluster_cmd_add(out, "--name");
    cluster_cmd_add(out, n->name);
    if (n->model[0]) {
        if ((rc = clusterfile_node_path(cf, n, n->model, p, sizeof(p), err)) < 0) goto fail;
        cluster_cmd_add(out, "-m");
        cluster_cmd_add(out, p);
    }
    if (cf->secret_file[0]) {
        if ((rc = clusterfile_node_path(cf, n, cf->secret_file, p, sizeof(p), err)) < 0) goto fail;
        cluster_cmd_add(out, "--secret-file");
        cluster_cmd_add(out, p);
    }
    const char *dev = n->device[0] ? n->device : cf->device[0] ? cf->device : "cpu";
    cluster_cmd_add(out, "--device");
    cluster_cmd_add(out, dev);
    if (n->threads) {
        cluster_cmd_add(out, "--threads");
        cluster_cmd_addf(out, "%d", n->threads);
    }
    if (n->max_memory_bytes) {
        cluster_cmd_add(out, "--max-memory");
        cluster_cmd_addf(out, "%llu", (unsigned long long)n->max_memory_bytes);
    }
    if (n->cache_dir[0]) {
        if ((rc = clusterfile_node_path(cf, n, n->cache_dir, p, sizeof(p), err)) < 0) goto fail;
        cluster_cmd_add(out, "--cache-dir");
        cluster_cmd_add(out, p);
    }
    if (cf->log_level[0]) {
        cluster_cmd_add(out, "--log-level");
        cluster_cmd_add(out, cf->log_level);
    }
    if ((rc = cmd_check(out, err)) < 0) goto fail;
    return ST_OK;
fail:
    cluster_cmd_free(out);
    return rc;
}

int clusterfile_coordinator_cmd(const struct clusterfile *cf, const struct clusterfile_node *n, const char *strata,
                                struct cluster_cmd *out, char *err)
{
    int rc;
    char p[CLUSTERFILE_PATH_MAX * 2 + 2];
    cluster_cmd_init(out);
    if (n->coordinator == CLUSTERFILE_COORD_NO)
        return err_set(err, ST_EINVAL, "node %s is not a coordinator candidate (coordinator = candidate)", n->name);
    cluster_cmd_add(out, node_strata(cf, n, strata));
    cluster_cmd_add(out, "serve");
    if ((rc = clusterfile_node_path(cf, n, n->model[0] ? n->model : cf->model, p, sizeof(p), err)) < 0) goto fail;
    cluster_cmd_add(out, "-m");
    cluster_cmd_add(out, p);
    cluster_cmd_add(out, "--host");
    cluster_cmd_add(out, cf->api_host[0] ? cf->api_host : n->host);
    cluster_cmd_add(out, "--port");
    cluster_cmd_addf(out, "%d", n->api_port ? n->api_port : cf->api_port);
    cluster_cmd_add(out, "--coordinator-only");
    for (int i = 0; i < cf->n_nodes; i++) {
        const struct clusterfile_node *w = &cf->nodes[i];
        if (!w->worker) continue;
        cluster_cmd_add(out, "--worker");
        cluster_cmd_addf(out, "%s:%d", w->host, w->port);
    }
    if (cf->layers[0]) {
        cluster_cmd_add(out, "--layers");
        cluster_cmd_add(out, cf->layers);
    }
    if (cf->secret_file[0]) {
        if ((rc = clusterfile_node_path(cf, n, cf->secret_file, p, sizeof(p), err)) < 0) goto fail;
        cluster_cmd_add(out, "--secret-file");
        cluster_cmd_add(out, p);
    }
    if (cf->api_key_file[0]) {
        if ((rc = clusterfile_node_path(cf, n, cf->api_key_file, p, sizeof(p), err)) < 0) goto fail;
        cluster_cmd_add(out, "--api-key-file");
        cluster_cmd_add(out, p);
    }
    if (cf->send_weights) cluster_cmd_add(out, "--send-weights");
    if (cf->parallel) {
        cluster_cmd_add(out, "--parallel");
        cluster_cmd_addf(out, "%d", cf->parallel);
    }
    if (cf->ctx) {
        cluster_cmd_add(out, "--ctx");
        cluster_cmd_addf(out, "%d", cf->ctx);
    }
    if (cf->model_name[0]) {
        cluster_cmd_add(out, "--model-name");
        cluster_cmd_add(out, cf->model_name);
    }
    if (cf->log_level[0]) {
        cluster_cmd_add(out, "--log-level");
        cluster_cmd_add(out, cf->log_level);
    }
    if ((rc = cmd_check(out, err)) < 0) goto fail;
    return ST_OK;
fail:
    cluster_cmd_free(out);
    return rc;
}

int cluster_ssh_cmd(const char *target, const char *script, struct cluster_cmd *out, char *err)
{
    cluster_cmd_init(out);
    if (!target[0] || target[0] == '-') return err_set(err, ST_EINVAL, "bad ssh target \"%s\"", target);
    size_t cap = strlen(script) * 4 + 16;
    char *q = malloc(cap), *remote = malloc(cap + 8);
    if (!q || !remote || cluster_shell_quote(script, q, cap) < 0) {
        free(q);
        free(remote);
        return err_set(err, ST_ENOMEM, "out of memory");
    }
    snprintf(remote, cap + 8, "sh -c %s", q);
    const char *words[] = {"ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "--", target, remote};
    for (size_t i = 0; i < ST_ARRAY_LEN(words); i++) cluster_cmd_add(out, words[i]);
    free(q);
    free(remote);
    int rc = cmd_check(out, err);
    if (rc < 0) cluster_cmd_free(out);
    return rc;
}

int clusterfile_launch_cmd(const struct clusterfile *cf, const struct clusterfile_node *n,
                           const struct cluster_cmd *inner, const char *log, struct cluster_cmd *out, char *err)
{
    int rc = ST_OK;
    (void)cf;
    cluster_cmd_init(out);
    if (inner->failed || inner->argc == 0) return err_set(err, ST_EINVAL, "empty command");
    if (n->launch == CLUSTERFILE_LAUNCH_LOCAL) {
        for (int i = 0; i < inner->argc; i++) cluster_cmd_add(out, inner->argv[i]);
    } else if (n->launch == CLUSTERFILE_LAUNCH_NETNS) {
        cluster_cmd_add(out, "ip");
        cluster_cmd_add(out, "netns");
        cluster_cmd_add(out, "exec");
        cluster_cmd_add(out, n->target);
        for (int i = 0; i < inner->argc; i++) cluster_cmd_add(out, inner->argv[i]);
    } else {
        size_t cap = 64 * 1024;
        char *script = malloc(cap), *words = malloc(cap), *qlog = malloc(cap), *qdir = malloc(cap);
        char dir[CLUSTERFILE_PATH_MAX];
        snprintf(dir, sizeof(dir), "%s", log);
        char *slash = strrchr(dir, '/');
        if (slash) *slash = 0;
        else snprintf(dir, sizeof(dir), ".");
        if (!script || !words || !qlog || !qdir) rc = err_set(err, ST_ENOMEM, "out of memory");
        else if (cmd_join(inner, 0, words, cap) < 0 || cluster_shell_quote(log, qlog, cap) < 0 ||
                 cluster_shell_quote(dir[0] ? dir : "/", qdir, cap) < 0)
            rc = err_set(err, ST_ERANGE, "command line too long");
        else if ((size_t)snprintf(script, cap,
                                  "mkdir -p %s || exit 1; nohup %s >>%s 2>&1 </dev/null & p=$!; "
                                  "echo \"$p $(cut -d' ' -f22 /proc/$p/stat 2>/dev/null)\"",
                                  qdir, words, qlog) >= cap)
            rc = err_set(err, ST_ERANGE, "command line too long");
        if (rc == ST_OK) rc = cluster_ssh_cmd(n->target, script, out, err);
        free(script);
        free(words);
        free(qlog);
        free(qdir);
        return rc;
    }
    if ((rc = cmd_check(out, err)) < 0) cluster_cmd_free(out);
    return rc;
}

/* A shell condition true while the process is there (and is the one that started at start_time). */
static void ssh_alive_test(int pid, uint64_t start_time, char *out, size_t cap)
{
    if (start_time)
        snprintf(out, cap, "[ \"$(cut -d' ' -f22 /proc/%d/stat 2>/dev/null)\" = %llu ]", pid,
                 (unsigned long long)start_time);
    else
        snprintf(out, cap, "kill -0 %d 2>/dev/null", pid);
}

int cluster_ssh_stop_script(int pid, uint64_t start_time, int timeout_s, char *out, size_t cap)
{
    char alive[160];
    if (pid <= 0) return ST_EINVAL;
    ssh_alive_test(pid, start_time, alive, sizeof(alive));
    int n = snprintf(out, cap,
                     "p=%d; %s || { echo gone; exit 0; }; kill -TERM $p 2>/dev/null; end=$(($(date +%%s)+%d)); "
                     "while %s; do if [ $(date +%%s) -ge $end ]; then kill -KILL $p 2>/dev/null; "
                     "echo killed; exit 0; fi; sleep 0.2 2>/dev/null || sleep 1; done; echo stopped",
                     pid, alive, timeout_s, alive);
    return n < 0 || (size_t)n >= cap ? ST_ERANGE : ST_OK;
}

int cluster_ssh_alive_script(int pid, uint64_t start_time, char *out, size_t cap)
{
    char alive[160];
    if (pid <= 0) return ST_EINVAL;
    ssh_alive_test(pid, start_time, alive, sizeof(alive));
    int n = snprintf(out, cap, "if %s; then echo alive; else echo gone; fi", alive);
    return n < 0 || (size_t)n >= cap ? ST_ERANGE : ST_OK;
}

int clusterfile_log_path(const struct clusterfile *cf, const struct clusterfile_node *n, const char *state_dir,
                         const char *role, char *out, size_t cap, char *err)
{
    int w;
    if (n->launch == CLUSTERFILE_LAUNCH_SSH) {
        if (cf->remote_dir[0]) w = snprintf(out, cap, "%s/%s.%s.log", cf->remote_dir, n->name, role);
        else w = snprintf(out, cap, ".local/state/strata/%s/%s.%s.log", cf->name, n->name, role);
    } else {
        w = snprintf(out, cap, "%s/logs/%s.%s.log", state_dir, n->name, role);
    }
    if (w < 0 || (size_t)w >= cap) return err_set(err, ST_ERANGE, "log path too long");
    return ST_OK;
}

/* ---- state ---- */

const char *cluster_role_name(enum cluster_role r)
{
    return r == CLUSTER_ROLE_WORKER ? "worker" : r == CLUSTER_ROLE_COORDINATOR ? "coordinator" : "?";
}

struct st_parse {
    struct cluster_state *st;
    int section; /* 0 none, 1 [state], 2 [process ...] */
    uint32_t seen;
};

static int st_section(void *ctx, int line, const char *name, const char *arg, char *err)
{
    struct st_parse *ps = ctx;
    (void)line;
    ps->seen = 0;
    if (!strcmp(name, "state") && !arg[0]) {
        ps->section = 1;
        return ST_OK;
    }
    if (strcmp(name, "process")) return err_set(err, ST_EFORMAT, "unknown section [%s]", name);
    char role[32], node[128];
    const char *sp = strchr(arg, ' ');
    if (!sp || (size_t)(sp - arg) >= sizeof(role) || strlen(sp + 1) >= sizeof(node))
        return err_set(err, ST_EFORMAT, "expected [process ROLE NODE]");
    memcpy(role, arg, (size_t)(sp - arg));
    role[sp - arg] = 0;
    snprintf(node, sizeof(node), "%s", sp + 1);
    struct cluster_proc p = {0};
    if (!strcmp(role, "worker")) p.role = CLUSTER_ROLE_WORKER;
    else if (!strcmp(role, "coordinator")) p.role = CLUSTER_ROLE_COORDINATOR;
    else return err_set(err, ST_EFORMAT, "unknown role \"%s\"", role);
    if (!name_ok(node)) return err_set(err, ST_EFORMAT, "bad node name \"%s\"", node);
    snprintf(p.node, sizeof(p.node), "%s", node);
    if (cluster_state_find(ps->st, p.role, p.node)) return err_set(err, ST_EFORMAT, "[process %s] twice", arg);
    if (ps->st->n_procs >= CLUSTER_STATE_MAX_PROCS) return err_set(err, ST_ERANGE, "too many processes");
    ps->st->procs[ps->st->n_procs++] = p;
    ps->section = 2;
    return ST_OK;
}

static int st_key(void *ctx, int line, const char *key, const char *v, char *err)
{
    struct st_parse *ps = ctx;
    (void)line;
    static const char *const keys[] = {"cluster", "pid", "start_time", "launch", "target", "address", "log",
                                       "started"};
    int k = key_index(keys, ST_ARRAY_LEN(keys), key);
    if (k < 0) return err_set(err, ST_EFORMAT, "unknown key \"%s\"", key);
    if (ps->seen & (1u << k)) return err_set(err, ST_EFORMAT, "%s set twice", key);
    ps->seen |= 1u << k;
    if (ps->section == 1) {
        if (k != 0) return err_set(err, ST_EFORMAT, "unknown key \"%s\" in [state]", key);
        return parse_name(ps->st->cluster, key, v, err);
    }
    if (ps->section != 2 || k == 0) return err_set(err, ST_EFORMAT, "\"%s\" outside a [process] section", key);
    struct cluster_proc *p = &ps->st->procs[ps->st->n_procs - 1];
    char *end;
    errno = 0;
    switch (k) {
    case 1: return parse_int(&p->pid, key, v, 1, 1 << 30, err);
    case 2:
        p->start_time = strtoull(v, &end, 10);
        if (errno || end == v || *end || !isdigit((unsigned char)v[0]))
            return err_set(err, ST_EFORMAT, "start_time: \"%s\" is not a number", v);
        return ST_OK;
    case 3:
        if (clusterfile_launch_parse(v, &p->launch) < 0) return err_set(err, ST_EFORMAT, "launch: \"%s\"", v);
        return ST_OK;
    case 4: return copy_value(p->target, sizeof(p->target), key, v, err);
    case 5: return copy_value(p->address, sizeof(p->address), key, v, err);
    case 6: return copy_value(p->log, sizeof(p->log), key, v, err);
    case 7:
        p->started_unix = strtoll(v, &end, 10);
        if (errno || end == v || *end) return err_set(err, ST_EFORMAT, "started: \"%s\" is not a number", v);
        return ST_OK;
    default: return ST_EFORMAT;
    }
}

int cluster_state_load(struct cluster_state *st, const char *path, char *err)
{
    memset(st, 0, sizeof(*st));
    if (!file_exists(path)) return ST_OK;
    char *text = NULL;
    size_t len = 0;
    int rc = file_read_all(path, &text, &len, CLUSTERFILE_MAX_BYTES, err);
    if (rc < 0) return rc;
    struct st_parse ps = {.st = st};
    struct ini_handler h = {.section = st_section, .key = st_key, .ctx = &ps};
    rc = ini_walk(text, len, path, &h, err);
    free(text);
    if (rc < 0) {
        memset(st, 0, sizeof(*st));
        return err_prefix(err, rc, "state file (remove it if no process of the cluster runs)");
    }
    for (int i = 0; i < st->n_procs; i++)
        if (st->procs[i].pid <= 0 || !st->procs[i].address[0]) {
            rc = err_set(err, ST_EFORMAT, "%s: process %s %s lacks pid or address", path,
                         cluster_role_name(st->procs[i].role), st->procs[i].node);
            memset(st, 0, sizeof(*st));
            return rc;
        }
    return ST_OK;
}

/* Writes a value in double quotes with \" and \\ escaped. */
static int put_quoted(FILE *f, const char *key, const char *v)
{
    for (const char *p = v; *p; p++)
        if ((unsigned char)*p < 0x20) return ST_EINVAL;
    fprintf(f, "%s = \"", key);
    for (const char *p = v; *p; p++) {
        if (*p == '"' || *p == '\\') fputc('\\', f);
        fputc(*p, f);
    }
    fputs("\"\n", f);
    return ST_OK;
}

int cluster_state_save(const struct cluster_state *st, const char *path, char *err)
{
    if (st->n_procs == 0) {
        if (unlink(path) < 0 && errno != ENOENT)
            return err_set(err, ST_EIO, "cannot remove %s: %s", path, strerror(errno));
        return ST_OK;
    }
    char tmp[CLUSTERFILE_PATH_MAX + 16];
    if ((size_t)snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= sizeof(tmp))
        return err_set(err, ST_ERANGE, "state path too long");
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0) return err_set(err, ST_EIO, "cannot write %s: %s", tmp, strerror(errno));
    FILE *f = fdopen(fd, "w");
    if (!f) {
        close(fd);
        unlink(tmp);
        return err_set(err, ST_EIO, "cannot write %s: %s", tmp, strerror(errno));
    }
    int rc = ST_OK;
    fprintf(f, "# strata cluster state: written by `strata cluster` (start, stop, migrate); do not edit\n");
    fprintf(f, "[state]\ncluster = %s\n", st->cluster[0] ? st->cluster : "unnamed");
    for (int i = 0; i < st->n_procs && rc == ST_OK; i++) {
        const struct cluster_proc *p = &st->procs[i];
        fprintf(f, "\n[process %s %s]\npid = %d\nstart_time = %llu\nlaunch = %s\nstarted = %lld\n",
                cluster_role_name(p->role), p->node, p->pid, (unsigned long long)p->start_time,
                clusterfile_launch_name(p->launch), (long long)p->started_unix);
        if (p->target[0]) rc = put_quoted(f, "target", p->target);
        if (rc == ST_OK) rc = put_quoted(f, "address", p->address);
        if (rc == ST_OK && p->log[0]) rc = put_quoted(f, "log", p->log);
    }
    if (rc < 0) err_set(err, rc, "state: a value holds a control character");
    if (fflush(f) != 0 || fsync(fileno(f)) != 0) rc = err_set(err, ST_EIO, "cannot write %s: %s", tmp, strerror(errno));
    if (fclose(f) != 0 && rc == ST_OK) rc = err_set(err, ST_EIO, "cannot write %s: %s", tmp, strerror(errno));
    if (rc == ST_OK && rename(tmp, path) < 0)
        rc = err_set(err, ST_EIO, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
    if (rc < 0) unlink(tmp);
    return rc;
}

struct cluster_proc *cluster_state_find(struct cluster_state *st, enum cluster_role role, const char *node)
{
    for (int i = 0; i < st->n_procs; i++)
        if (st->procs[i].role == role && (!node || !strcmp(st->procs[i].node, node))) return &st->procs[i];
    return NULL;
}

int cluster_state_put(struct cluster_state *st, const struct cluster_proc *p)
{
    struct cluster_proc *old = cluster_state_find(st, p->role, p->node);
    if (old) {
        *old = *p;
        return ST_OK;
    }
    if (st->n_procs >= CLUSTER_STATE_MAX_PROCS) return ST_ERANGE;
    st->procs[st->n_procs++] = *p;
    return ST_OK;
}

void cluster_state_remove(struct cluster_state *st, enum cluster_role role, const char *node)
{
    for (int i = 0; i < st->n_procs; i++)
        if (st->procs[i].role == role && !strcmp(st->procs[i].node, node)) {
            memmove(&st->procs[i], &st->procs[i + 1], sizeof(st->procs[0]) * (size_t)(st->n_procs - i - 1));
            st->n_procs--;
            return;
        }
}

/* ---- processes ---- */

static void sleep_ms(int ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {}
}

int cluster_proc_spawn(const struct cluster_cmd *cmd, const char *log, int *pid, char *err)
{
    *pid = 0;
    if (cmd->failed || cmd->argc == 0) return err_set(err, ST_EINVAL, "empty command");
    int logfd = open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (logfd < 0) return err_set(err, ST_EIO, "cannot open the log %s: %s", log, strerror(errno));
    int nullfd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    int pfd[2];
    if (nullfd < 0 || pipe2(pfd, O_CLOEXEC) < 0) {
        int e = errno;
        close(logfd);
        if (nullfd >= 0) close(nullfd);
        return err_set(err, ST_EIO, "cannot start %s: %s", cmd->argv[0], strerror(e));
    }
    pid_t p = fork();
    if (p < 0) {
        int e = errno;
        close(logfd);
        close(nullfd);
        close(pfd[0]);
        close(pfd[1]);
        return err_set(err, ST_EIO, "fork: %s", strerror(e));
    }
    if (p == 0) {
        /* child: async-signal-safe calls only */
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGPIPE, SIG_DFL);
        setsid();
        dup2(nullfd, 0);
        dup2(logfd, 1);
        dup2(logfd, 2);
        execvp(cmd->argv[0], cmd->argv);
        int e = errno;
        ssize_t w = write(pfd[1], &e, sizeof(e));
        (void)w;
        _exit(127);
    }
    close(logfd);
    close(nullfd);
    close(pfd[1]);
    int e = 0;
    ssize_t r;
    while ((r = read(pfd[0], &e, sizeof(e))) < 0 && errno == EINTR) {}
    close(pfd[0]);
    if (r == (ssize_t)sizeof(e)) {
        waitpid(p, NULL, 0);
        return err_set(err, ST_ENOTFOUND, "cannot run %s: %s", cmd->argv[0], strerror(e));
    }
    *pid = (int)p;
    return ST_OK;
}

/* State letter and start time of pid from /proc/PID/stat. */
static int proc_stat(int pid, char *state, uint64_t *start_time)
{
    char path[64], buf[1024];
    snprintf(path, sizeof(path), "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return ST_ENOTFOUND;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0) return ST_ENOTFOUND;
    buf[n] = 0;
    char *rp = strrchr(buf, ')');
    if (!rp || rp[1] != ' ') return ST_EFORMAT;
    char *p = rp + 2;
    *state = *p;
    /* fields after ')' start at field 3 (state); starttime is field 22 */
    for (int field = 3; field < 22; field++) {
        p = strchr(p, ' ');
        if (!p) return ST_EFORMAT;
        p++;
    }
    char *end;
    errno = 0;
    *start_time = strtoull(p, &end, 10);
    if (errno || end == p) return ST_EFORMAT;
    return ST_OK;
}

int cluster_proc_start_time(int pid, uint64_t *start_time, char *err)
{
    char state;
    if (pid <= 0) return err_set(err, ST_EINVAL, "bad pid %d", pid);
    int rc = proc_stat(pid, &state, start_time);
    if (rc < 0) return err_set(err, rc, "no process %d", pid);
    return ST_OK;
}

bool cluster_proc_alive(int pid, uint64_t start_time)
{
    if (pid <= 0) return false;
    int status;
    if (waitpid(pid, &status, WNOHANG) == pid) return false; /* our child, and it just ended */
    char state;
    uint64_t t;
    if (proc_stat(pid, &state, &t) < 0) return false;
    if (state == 'Z' || state == 'X' || state == 'x') return false;
    return start_time == 0 || t == start_time;
}

int cluster_proc_stop(int pid, uint64_t start_time, int timeout_ms, bool *killed, char *err)
{
    *killed = false;
    if (!cluster_proc_alive(pid, start_time)) return ST_OK;
    if (kill(pid, SIGTERM) < 0 && errno != ESRCH)
        return err_set(err, ST_EIO, "cannot signal process %d: %s", pid, strerror(errno));
    uint64_t deadline = time_ns() + (uint64_t)timeout_ms * 1000000ull;
    while (cluster_proc_alive(pid, start_time)) {
        if (time_ns() >= deadline) {
            *killed = true;
            kill(pid, SIGKILL);
            uint64_t d2 = time_ns() + 2000000000ull;
            while (cluster_proc_alive(pid, start_time)) {
                if (time_ns() >= d2) return err_set(err, ST_ETIMEDOUT, "process %d survives SIGKILL", pid);
                sleep_ms(20);
            }
            return ST_OK;
        }
        sleep_ms(20);
    }
    return ST_OK;
}

int cluster_run_capture(const struct cluster_cmd *cmd, int timeout_ms, char *out, size_t cap, char *err_out,
                        size_t err_cap, int *status, char *err)
{
    *status = -1;
    if (cap) out[0] = 0;
    if (err_out && err_cap) err_out[0] = 0;
    if (cmd->failed || cmd->argc == 0) return err_set(err, ST_EINVAL, "empty command");
    int po[2] = {-1, -1}, pe[2] = {-1, -1}, px[2] = {-1, -1};
    int nullfd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (nullfd < 0 || pipe2(po, O_CLOEXEC) < 0 || pipe2(pe, O_CLOEXEC) < 0 || pipe2(px, O_CLOEXEC) < 0) {
        int e = errno;
        int fds[] = {nullfd, po[0], po[1], pe[0], pe[1], px[0], px[1]};
        for (size_t i = 0; i < ST_ARRAY_LEN(fds); i++)
            if (fds[i] >= 0) close(fds[i]);
        return err_set(err, ST_EIO, "pipe: %s", strerror(e));
    }
    pid_t p = fork();
    if (p == 0) {
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGPIPE, SIG_DFL);
        setpgid(0, 0);
        dup2(nullfd, 0);
        dup2(po[1], 1);
        dup2(pe[1], 2);
        execvp(cmd->argv[0], cmd->argv);
        int e = errno;
        ssize_t w = write(px[1], &e, sizeof(e));
        (void)w;
        _exit(127);
    }
    close(nullfd);
    close(po[1]);
    close(pe[1]);
    close(px[1]);
    if (p < 0) {
        int e = errno;
        close(po[0]);
        close(pe[0]);
        close(px[0]);
        return err_set(err, ST_EIO, "fork: %s", strerror(e));
    }
    int e = 0, rc = ST_OK;
    ssize_t r;
    while ((r = read(px[0], &e, sizeof(e))) < 0 && errno == EINTR) {}
    close(px[0]);
    if (r == (ssize_t)sizeof(e)) {
        close(po[0]);
        close(pe[0]);
        waitpid(p, NULL, 0);
        return err_set(err, ST_ENOTFOUND, "cannot run %s: %s", cmd->argv[0], strerror(e));
    }
    size_t n_out = 0, n_err = 0;
    bool open_out = true, open_err = true;
    uint64_t deadline = time_ns() + (uint64_t)timeout_ms * 1000000ull;
    while (open_out || open_err) {
        uint64_t now = time_ns();
        if (now >= deadline) {
            rc = err_set(err, ST_ETIMEDOUT, "%s did not finish within %d ms", cmd->argv[0], timeout_ms);
            break;
        }
        struct pollfd pf[2] = {{.fd = open_out ? po[0] : -1, .events = POLLIN},
                               {.fd = open_err ? pe[0] : -1, .events = POLLIN}};
        int left = (int)((deadline - now) / 1000000ull) + 1;
        int k = poll(pf, 2, left);
        if (k < 0 && errno != EINTR) {
            rc = err_set(err, ST_EIO, "poll: %s", strerror(errno));
            break;
        }
        char buf[4096];
        for (int i = 0; i < 2; i++) {
            if (!(pf[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            ssize_t got = read(pf[i].fd, buf, sizeof(buf));
            if (got < 0 && errno == EINTR) continue;
            if (got <= 0) {
                if (i == 0) open_out = false;
                else open_err = false;
                continue;
            }
            char *dst = i == 0 ? out : err_out;
            size_t dcap = i == 0 ? cap : (err_out ? err_cap : 0), *dn = i == 0 ? &n_out : &n_err;
            if (dcap > 1 && *dn < dcap - 1) {
                size_t take = ST_MIN((size_t)got, dcap - 1 - *dn);
                memcpy(dst + *dn, buf, take);
                *dn += take;
                dst[*dn] = 0;
            }
        }
    }
    close(po[0]);
    close(pe[0]);
    if (rc < 0) {
        kill(-p, SIGKILL);
        kill(p, SIGKILL);
    }
    int st = 0;
    uint64_t d2 = time_ns() + (rc < 0 ? 2000000000ull : (uint64_t)ST_MAX(timeout_ms, 1) * 1000000ull);
    for (;;) {
        pid_t w = waitpid(p, &st, WNOHANG);
        if (w == p) break;
        if (w < 0 && errno != EINTR) break;
        if (time_ns() >= d2) {
            kill(-p, SIGKILL);
            kill(p, SIGKILL);
            waitpid(p, &st, 0);
            if (rc == ST_OK) rc = err_set(err, ST_ETIMEDOUT, "%s did not exit within %d ms", cmd->argv[0], timeout_ms);
            break;
        }
        sleep_ms(10);
    }
    *status = WIFEXITED(st) ? WEXITSTATUS(st) : WIFSIGNALED(st) ? 128 + WTERMSIG(st) : -1;
    return rc;
}

int cluster_log_last_line(const char *file, uint64_t offset, const char *needle, char *out, size_t cap, char *err)
{
    if (cap) out[0] = 0;
    int fd = open(file, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return err_set(err, ST_EIO, "cannot read %s: %s", file, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) < 0) {
        close(fd);
        return err_set(err, ST_EIO, "cannot read %s: %s", file, strerror(errno));
    }
    uint64_t size = (uint64_t)sb.st_size, from = offset;
    if (size > 65536 && size - 65536 > from) from = size - 65536;
    if (from > size) from = size;
    size_t n = (size_t)(size - from);
    char *buf = malloc(n + 1);
    if (!buf) {
        close(fd);
        return err_set(err, ST_ENOMEM, "out of memory");
    }
    ssize_t got = pread(fd, buf, n, (off_t)from);
    close(fd);
    if (got < 0) {
        free(buf);
        return err_set(err, ST_EIO, "cannot read %s: %s", file, strerror(errno));
    }
    buf[got] = 0;
    for (ssize_t i = 0; i < got; i++)
        if (buf[i] == 0) buf[i] = ' ';
    int rc = ST_ENOTFOUND;
    char *end = buf + got;
    while (end > buf) {
        char *b = end;
        while (b > buf && b[-1] != '\n') b--;
        char *e = end;
        while (e > b && (e[-1] == '\n' || e[-1] == '\r' || is_blank(e[-1]))) e--;
        if (e > b) {
            char save = *e;
            *e = 0;
            if (!needle || strstr(b, needle)) {
                snprintf(out, cap, "%s", b);
                rc = ST_OK;
                break;
            }
            *e = save;
        }
        end = b > buf ? b - 1 : buf;
    }
    free(buf);
    if (rc < 0) return err_set(err, rc, "no %s line in %s", needle ? needle : "non-empty", file);
    return ST_OK;
}

/* ---- probes ---- */

static int ms_left(uint64_t deadline)
{
    uint64_t now = time_ns();
    return now >= deadline ? 0 : (int)((deadline - now) / 1000000ull);
}

int cluster_probe_worker(const char *host, int port, const void *secret, size_t secret_bytes, int timeout_ms,
                         struct node_info *ni, double *rtt_ms, char *err)
{
    memset(ni, 0, sizeof(*ni));
    if (rtt_ms) *rtt_ms = 0;
    uint64_t deadline = time_ns() + (uint64_t)timeout_ms * 1000000ull;
    struct net_conn_opts o = {.node_name = "strata-cluster", .secret = secret, .secret_bytes = secret_bytes,
                              .capabilities = NET_CAP_CHUNKED, .max_payload = 1u << 20};
    struct net_conn *c = NULL;
    uint8_t *data = NULL;
    int rc = net_conn_connect(&c, host, port, &o, timeout_ms, err);
    if (rc < 0) return rc;
    uint64_t t0 = time_ns();
    if ((rc = net_send(c, NET_MSG_INFO_REQ, 0, 1, NULL, 0, ms_left(deadline), err)) < 0) goto fail;
    for (;;) {
        struct net_frame f;
        size_t len = 0;
        if ((rc = net_recv_large(c, &f, &data, &len, 1u << 20, ms_left(deadline), err)) < 0) goto fail;
        if (f.type == NET_MSG_PONG) {
            free(data);
            data = NULL;
            continue;
        }
        if (f.type == NET_MSG_ERROR) {
            int code;
            char msg[NET_ERROR_MSG_MAX + 1];
            struct net_frame ef = {.type = NET_MSG_ERROR, .payload = data, .payload_bytes = (uint32_t)len};
            if (net_error_decode(&ef, &code, msg, sizeof(msg), err) < 0) rc = ST_EPROTO;
            else rc = err_set(err, code < 0 ? code : ST_EPROTO, "the worker answered: %s", msg);
            goto fail;
        }
        if (f.type != NET_MSG_INFO) {
            rc = err_set(err, ST_EPROTO, "expected INFO, got %s", net_msg_type_name(f.type));
            goto fail;
        }
        if ((rc = proto_get_info(data, len, ni, err)) < 0) goto fail;
        break;
    }
    if (rtt_ms) *rtt_ms = (double)(time_ns() - t0) / 1e6;
    free(data);
    net_conn_close(c, ST_MIN(200, ST_MAX(ms_left(deadline), 1)), NULL);
    net_conn_free(c);
    return ST_OK;
fail:
    free(data);
    net_conn_free(c);
    return rc;
}

/* Connects a TCP socket to host:port within the deadline; returns the fd or a negative code. */
static int tcp_connect(const char *host, int port, uint64_t deadline, char *err)
{
    char ps[16];
    snprintf(ps, sizeof(ps), "%d", port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res = NULL;
    int g = getaddrinfo(host, ps, &hints, &res);
    if (g != 0) return err_set(err, ST_EIO, "cannot resolve %s: %s", host, gai_strerror(g));
    int rc = err_set(err, ST_EIO, "cannot connect to %s:%d", host, port);
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) continue;
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) {
            freeaddrinfo(res);
            return fd;
        }
        if (errno != EINPROGRESS) {
            rc = err_set(err, ST_EIO, "cannot connect to %s:%d: %s", host, port, strerror(errno));
            close(fd);
            continue;
        }
        struct pollfd pf = {.fd = fd, .events = POLLOUT};
        int k;
        while ((k = poll(&pf, 1, ms_left(deadline))) < 0 && errno == EINTR) {}
        if (k == 0) {
            rc = err_set(err, ST_ETIMEDOUT, "connecting to %s:%d timed out", host, port);
            close(fd);
            break;
        }
        int soerr = 0;
        socklen_t sl = sizeof(soerr);
        if (k < 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) < 0 || soerr != 0) {
            rc = err_set(err, ST_EIO, "cannot connect to %s:%d: %s", host, port, strerror(soerr ? soerr : errno));
            close(fd);
            continue;
        }
        freeaddrinfo(res);
        return fd;
    }
    freeaddrinfo(res);
    return rc;
}

static bool header_is(const char *line, size_t len, const char *name, const char **value, size_t *vlen)
{
    size_t nl = strlen(name);
    if (len <= nl || line[nl] != ':' || strncasecmp(line, name, nl) != 0) return false;
    const char *v = line + nl + 1, *e = line + len;
    while (v < e && is_blank(*v)) v++;
    while (e > v && is_blank(e[-1])) e--;
    *value = v;
    *vlen = (size_t)(e - v);
    return true;
}

/* Parses resp[0..len). final: the peer has closed (a body without a length ends here). Returns 1 when complete
 * (status and body filled), 0 when more bytes are needed (only when !final), or a negative error. */
static int http_parse(const char *resp, size_t len, size_t max_body, bool final, int *status, char **body,
                      size_t *body_len, char *err)
{
    *body = NULL;
    *body_len = 0;
    const char *p = resp, *end = resp + len;
    for (;;) {
        /* the header block ends at an empty line */
        const char *hdr_end = NULL;
        for (const char *q = p; q + 1 < end; q++) {
            if (q[0] == '\n' && q[1] == '\n') { hdr_end = q + 2; break; }
            if (q + 3 < end && q[0] == '\r' && q[1] == '\n' && q[2] == '\r' && q[3] == '\n') { hdr_end = q + 4; break; }
        }
        if (!hdr_end) {
            if ((size_t)(end - p) > 65536) return err_set(err, ST_EFORMAT, "HTTP headers longer than 64 KiB");
            if (final) return err_set(err, ST_EFORMAT, "truncated HTTP response (%zu bytes, no end of headers)", len);
            return 0;
        }
        if (end - p < 12 || strncmp(p, "HTTP/1.", 7) != 0 || !isdigit((unsigned char)p[7]) || p[8] != ' ' ||
            !isdigit((unsigned char)p[9]) || !isdigit((unsigned char)p[10]) || !isdigit((unsigned char)p[11]))
            return err_set(err, ST_EFORMAT, "not an HTTP/1.x response");
        int code = (p[9] - '0') * 100 + (p[10] - '0') * 10 + (p[11] - '0');
        if (code < 100) return err_set(err, ST_EFORMAT, "bad HTTP status %d", code);
        bool chunked = false, have_len = false;
        uint64_t clen = 0;
        const char *line = memchr(p, '\n', (size_t)(hdr_end - p)) + 1;
        while (line < hdr_end) {
            const char *le = memchr(line, '\n', (size_t)(hdr_end - line));
            const char *next = le + 1;
            if (le > line && le[-1] == '\r') le--;
            const char *v;
            size_t vl;
            if (header_is(line, (size_t)(le - line), "Content-Length", &v, &vl)) {
                uint64_t x = 0;
                if (vl == 0 || vl > 18) return err_set(err, ST_EFORMAT, "bad Content-Length");
                for (size_t i = 0; i < vl; i++) {
                    if (!isdigit((unsigned char)v[i])) return err_set(err, ST_EFORMAT, "bad Content-Length");
                    x = x * 10 + (uint64_t)(v[i] - '0');
                }
                if (have_len && x != clen) return err_set(err, ST_EFORMAT, "conflicting Content-Length headers");
                have_len = true;
                clen = x;
            } else if (header_is(line, (size_t)(le - line), "Transfer-Encoding", &v, &vl)) {
                for (size_t i = 0; i + 7 <= vl; i++)
                    if (!strncasecmp(v + i, "chunked", 7)) chunked = true;
            }
            line = next;
        }
        p = hdr_end;
        if (code < 200) continue; /* 1xx: another header block follows */
        *status = code;
        if (code == 204 || code == 304) {
            *body = calloc(1, 1);
            return *body ? 1 : err_set(err, ST_ENOMEM, "out of memory");
        }
        if (chunked) {
            /* pass 1: find the end and the size; pass 2: copy */
            size_t total = 0;
            const char *q = p;
            for (;;) {
                const char *le = memchr(q, '\n', (size_t)(end - q));
                if (!le) goto need_more;
                uint64_t sz = 0;
                const char *h = q;
                int digits = 0;
                while (h < le && isxdigit((unsigned char)*h)) {
                    if (++digits > 15) return err_set(err, ST_EFORMAT, "HTTP chunk size too large");
                    sz = sz * 16 + (uint64_t)(isdigit((unsigned char)*h) ? *h - '0' : (tolower(*h) - 'a' + 10));
                    h++;
                }
                if (digits == 0 || (h < le && *h != ';' && *h != '\r'))
                    return err_set(err, ST_EFORMAT, "bad HTTP chunk header");
                q = le + 1;
                if (sz == 0) break; /* trailers (ignored) end with an empty line */
                if (sz > max_body || total + sz > max_body)
                    return err_set(err, ST_ERANGE, "HTTP body larger than %zu bytes", max_body);
                if ((uint64_t)(end - q) < sz + 1) goto need_more;
                q += sz;
                if (*q == '\r') q++;
                if (q >= end) goto need_more;
                if (*q != '\n') return err_set(err, ST_EFORMAT, "bad HTTP chunk end");
                q++;
                total += (size_t)sz;
            }
            for (;;) { /* trailer lines up to an empty one */
                const char *le = memchr(q, '\n', (size_t)(end - q));
                if (!le) goto need_more;
                bool empty = le == q || (le == q + 1 && *q == '\r');
                q = le + 1;
                if (empty) break;
            }
            char *b = malloc(total + 1);
            if (!b) return err_set(err, ST_ENOMEM, "out of memory");
            size_t at = 0;
            q = p;
            for (;;) {
                const char *le = memchr(q, '\n', (size_t)(end - q));
                size_t sz = (size_t)strtoull(q, NULL, 16);
                q = le + 1;
                if (sz == 0) break;
                memcpy(b + at, q, sz);
                at += sz;
                q += sz;
                if (*q == '\r') q++;
                q++;
            }
            b[at] = 0;
            *body = b;
            *body_len = at;
            return 1;
        }
        size_t have = (size_t)(end - p);
        size_t n;
        if (have_len) {
            if (clen > max_body) return err_set(err, ST_ERANGE, "HTTP body larger than %zu bytes", max_body);
            if (have < clen) {
                if (final)
                    return err_set(err, ST_EFORMAT, "truncated HTTP body (%zu of %llu bytes)", have,
                                   (unsigned long long)clen);
                return 0;
            }
            n = (size_t)clen;
        } else {
            if (have > max_body) return err_set(err, ST_ERANGE, "HTTP body larger than %zu bytes", max_body);
            if (!final) return 0;
            n = have;
        }
        char *b = malloc(n + 1);
        if (!b) return err_set(err, ST_ENOMEM, "out of memory");
        memcpy(b, p, n);
        b[n] = 0;
        *body = b;
        *body_len = n;
        return 1;
    need_more:
        if (final) return err_set(err, ST_EFORMAT, "truncated chunked HTTP body");
        return 0;
    }
}

int cluster_http_parse(const char *resp, size_t len, size_t max_body, int *status, char **body, size_t *body_len,
                       char *err)
{
    *status = 0;
    int rc = http_parse(resp, len, max_body, true, status, body, body_len, err);
    return rc < 0 ? rc : ST_OK;
}

int cluster_http_get(const char *host, int port, const char *path, const char *bearer, int timeout_ms,
                     size_t max_body, int *status, char **body, size_t *body_len, char *err)
{
    *status = 0;
    *body = NULL;
    *body_len = 0;
    if (path[0] != '/' || strpbrk(path, " \r\n\t") || strlen(path) > 2048)
        return err_set(err, ST_EINVAL, "bad HTTP path");
    if (bearer && (strpbrk(bearer, "\r\n") || strlen(bearer) > 4096))
        return err_set(err, ST_EINVAL, "bad API key (a line break, or too long)");
    uint64_t deadline = time_ns() + (uint64_t)timeout_ms * 1000000ull;
    char *req = NULL, *buf = NULL;
    int fd = tcp_connect(host, port, deadline, err);
    if (fd < 0) return fd;
    int rc;
    size_t req_cap = 8192 + (bearer ? strlen(bearer) : 0);
    req = malloc(req_cap);
    size_t cap = max_body + 65536 + 1;
    buf = malloc(cap);
    if (!req || !buf) {
        rc = err_set(err, ST_ENOMEM, "out of memory");
        goto fail;
    }
    bool v6 = strchr(host, ':') != NULL;
    int n = snprintf(req, req_cap,
                     "GET %s HTTP/1.1\r\nHost: %s%s%s:%d\r\nUser-Agent: strata-cluster\r\nAccept: */*\r\n"
                     "Connection: close\r\n%s%s%s\r\n",
                     path, v6 ? "[" : "", host, v6 ? "]" : "", port, bearer ? "Authorization: Bearer " : "",
                     bearer ? bearer : "", bearer ? "\r\n" : "");
    size_t sent = 0;
    while (sent < (size_t)n) {
        ssize_t w = send(fd, req + sent, (size_t)n - sent, MSG_NOSIGNAL);
        if (w > 0) {
            sent += (size_t)w;
            continue;
        }
        if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            rc = err_set(err, ST_EIO, "sending to %s:%d: %s", host, port, strerror(errno));
            goto fail;
        }
        struct pollfd pf = {.fd = fd, .events = POLLOUT};
        if (poll(&pf, 1, ms_left(deadline)) == 0) {
            rc = err_set(err, ST_ETIMEDOUT, "sending to %s:%d timed out", host, port);
            goto fail;
        }
    }
    size_t got = 0;
    for (;;) {
        if (got > 0) {
            rc = http_parse(buf, got, max_body, false, status, body, body_len, err);
            if (rc < 0) goto fail;
            if (rc == 1) break;
        }
        if (got >= cap - 1) {
            rc = err_set(err, ST_ERANGE, "HTTP response larger than %zu bytes", cap - 1);
            goto fail;
        }
        ssize_t r = recv(fd, buf + got, cap - 1 - got, 0);
        if (r > 0) {
            got += (size_t)r;
            continue;
        }
        if (r == 0) {
            rc = http_parse(buf, got, max_body, true, status, body, body_len, err);
            if (rc < 0) goto fail;
            break;
        }
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            rc = err_set(err, ST_EIO, "reading from %s:%d: %s", host, port, strerror(errno));
            goto fail;
        }
        struct pollfd pf = {.fd = fd, .events = POLLIN};
        int left = ms_left(deadline);
        if (left == 0 || poll(&pf, 1, left) == 0) {
            rc = err_set(err, ST_ETIMEDOUT, "no complete HTTP answer from %s:%d within %d ms", host, port,
                         timeout_ms);
            goto fail;
        }
    }
    close(fd);
    free(req);
    free(buf);
    return ST_OK;
fail:
    close(fd);
    free(req);
    free(buf);
    free(*body);
    *body = NULL;
    *body_len = 0;
    return rc;
}
