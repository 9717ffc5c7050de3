/* strata cluster: start, stop, restart, inspect and migrate a cluster described by a cluster file.
 *
 *   start    workers first (each until it answers INFO over the cluster link), then the coordinator (until its
 *            /health is 200: it has connected, planned, loaded and verified every worker). Any failure stops
 *            what this run started and says why (the coordinator's own message: weights that differ, a node
 *            lacking memory, ...).
 *   stop     the coordinator (SIGTERM: in-flight requests finish or get an error), then the workers; SIGKILL for
 *            what outlives stop_timeout. Nothing recorded is left running.
 *   restart  stop, then start with the coordinator where it was (a migration is kept).
 *   status   a table (or --json) from the state file, the workers' INFO and the coordinator's /v1/cluster.
 *   migrate  moves the coordinator role: the old coordinator drains and exits, a new one starts on --to NODE
 *            over the same workers (which keep their loaded layers) and is verified; clients reconnect there.
 *
 * What was started is recorded in STATE_DIR/state (clusterfile.h), under a lock (STATE_DIR/lock) that start,
 * stop, restart and migrate hold; status takes no lock. */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cli/cli.h"
#include "cluster/clusterfile.h"
#include "core/core.h"

#define PROBE_MS 3000           /* one INFO / HTTP probe (a healthy peer answers in ms; loaded machines are slow) */
#define POLL_MS 200             /* between probes while waiting */
#define SSH_MS 30000            /* one ssh command */
#define MAX_JSON (4u << 20)     /* /v1/cluster answer */

static volatile sig_atomic_t g_interrupted;
static void on_signal(int sig) { g_interrupted = sig; }

struct cl {
    const char *sub;                   /* "start", ... (for messages) */
    struct clusterfile cf;
    char state_dir[CLUSTERFILE_PATH_MAX], state_path[CLUSTERFILE_PATH_MAX + 16];
    int lock_fd;
    struct cluster_state *st;
    char *secret;
    size_t secret_len;
    char *api_key;
    char self[PATH_MAX];
    bool json, dry_run;
    /* processes started by this run (rolled back on failure): state entries by role and node */
    int n_started;
    struct { enum cluster_role role; char node[CLUSTERFILE_NAME_MAX + 1]; } started[CLUSTER_STATE_MAX_PROCS];
};

static void usage(FILE *f, const char *sub)
{
    if (!sub || !strcmp(sub, "cluster")) {
        fprintf(f,
                "usage: strata cluster start|stop|restart|status|migrate -c FILE [options]\n"
                "\n"
                "Runs a strata cluster described by a cluster file (an INI file: [cluster] settings and one\n"
                "[node NAME] section per machine; see docs/operations.md):\n"
                "  start     start the workers (ssh for other machines, plain processes or network namespaces\n"
                "            here), wait until each answers, then start the coordinator and wait until it has\n"
                "            loaded and verified every worker and serves the API\n"
                "  stop      stop the coordinator (in-flight requests finish or get an error), then the workers\n"
                "  restart   stop, then start (the coordinator stays on the node it was migrated to)\n"
                "  status    node, address, role, layers, device, free memory, weights verified, last heartbeat,\n"
                "            tokens/s (--json for a JSON document); exit 0 healthy, 1 degraded, 3 stopped\n"
                "  migrate   move the coordinator role (API, scheduling) to another node: --to NODE\n"
                "\n"
                "  -c, --config FILE   the cluster file (default: env STRATA_CLUSTER_FILE)\n"
                "  strata cluster SUBCOMMAND --help   options of each subcommand\n");
        return;
    }
    if (!strcmp(sub, "start") || !strcmp(sub, "restart"))
        fprintf(f,
                "usage: strata cluster %s -c FILE [--dry-run]\n"
                "\n"
                "%s"
                "Starts a worker on every node with worker = yes and waits until each answers over the cluster\n"
                "link (with the cluster secret), then the coordinator on the node with coordinator = yes%s,\n"
                "and waits until its /health is 200: it has connected to every worker, planned the layers,\n"
                "had each load its layers and verified their hashes. A worker that fails, weights that differ\n"
                "or a node lacking memory stop everything this command started, and the reason is printed.\n"
                "\n"
                "  -c, --config FILE   the cluster file\n"
                "  --dry-run           print the commands that would run, start nothing\n",
                sub, !strcmp(sub, "restart") ? "Stops the cluster (as strata cluster stop), then starts it.\n" : "",
                !strcmp(sub, "restart") ? " (or the node it was migrated to)" : "");
    else if (!strcmp(sub, "stop"))
        fprintf(f,
                "usage: strata cluster stop -c FILE\n"
                "\n"
                "Stops the coordinator first (SIGTERM: it stops accepting requests and lets those in flight finish\n"
                "for a short grace period), then every worker; a process still there after stop_timeout seconds\n"
                "gets SIGKILL. Exit 0 when nothing of the cluster is left running.\n"
                "\n"
                "  -c, --config FILE   the cluster file\n");
    else if (!strcmp(sub, "status"))
        fprintf(f,
                "usage: strata cluster status -c FILE [--json]\n"
                "\n"
                "One line per node: NODE ADDRESS ROLE LAYERS DEVICE FREE VERIFIED HEARTBEAT TOK/S PROCESS.\n"
                "The device and free memory come from each worker (INFO), the layers, verification, heartbeats and\n"
                "tokens/s from the coordinator (GET /v1/cluster). Exit status: 0 everything runs and the\n"
                "coordinator is healthy, 1 degraded or partly running, 3 nothing runs.\n"
                "\n"
                "  -c, --config FILE   the cluster file\n"
                "  --json              one JSON document instead of the table\n");
    else if (!strcmp(sub, "migrate"))
        fprintf(f,
                "usage: strata cluster migrate -c FILE --to NODE\n"
                "\n"
                "Moves the coordinator role (HTTP API, tokenization, scheduling) to NODE, which must have\n"
                "coordinator = candidate (or yes). The old coordinator stops accepting requests and lets those in\n"
                "flight finish for a short grace period (the rest get an error saying it is shutting down); then\n"
                "the new coordinator starts over the same workers, which keep their loaded layers, verifies them\n"
                "and serves. Clients reconnect to the new address (printed, and in status). If the new one\n"
                "cannot start, the coordinator is started again where it was.\n"
                "\n"
                "  -c, --config FILE   the cluster file\n"
                "  --to NODE           the node that takes the coordinator role\n");
}

/* ---- helpers ---- */

static int mkdir_p(const char *path, mode_t mode, char *err)
{
    char buf[CLUSTERFILE_PATH_MAX];
    if (snprintf(buf, sizeof(buf), "%s", path) >= (int)sizeof(buf)) return err_set(err, ST_ERANGE, "path too long");
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(buf, mode) < 0 && errno != EEXIST) return err_set(err, ST_EIO, "mkdir %s: %s", buf, strerror(errno));
        *p = '/';
    }
    if (mkdir(buf, mode) < 0 && errno != EEXIST) return err_set(err, ST_EIO, "mkdir %s: %s", buf, strerror(errno));
    return ST_OK;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static double gib(uint64_t b) { return (double)b / 1073741824.0; }

static void fmt_bytes(uint64_t b, char *out, size_t cap)
{
    if (b >= (1ull << 30)) snprintf(out, cap, "%.1f GiB", gib(b));
    else snprintf(out, cap, "%.0f MiB", (double)b / 1048576.0);
}

static void device_string(const struct node_info *ni, char *out, size_t cap)
{
    char tot[32];
    if (ni->dev_total_bytes) {
        fmt_bytes(ni->dev_total_bytes, tot, sizeof(tot));
        snprintf(out, cap, "%s, %s", ni->device, tot);
    } else {
        fmt_bytes(ni->mem_total_bytes, tot, sizeof(tot));
        snprintf(out, cap, "%s, %d cores, %s", ni->cpu[0] ? ni->cpu : "cpu", ni->cores, tot);
    }
}

static void ctx_free(struct cl *c)
{
    clusterfile_free(&c->cf);
    if (c->lock_fd >= 0) close(c->lock_fd);
    c->lock_fd = -1;
    free(c->st);
    free(c->secret);
    free(c->api_key);
}

/* Loads the cluster file and the state; takes the lock when asked. Prints the error. */
static int ctx_open(struct cl *c, const char *file, bool lock)
{
    char err[ST_ERR_LEN];
    c->lock_fd = -1;
    if (clusterfile_load(&c->cf, file, err) < 0) {
        fprintf(stderr, "strata cluster %s: %s\n", c->sub, err);
        return -1;
    }
    ssize_t n = readlink("/proc/self/exe", c->self, sizeof(c->self) - 1);
    if (n <= 0) {
        fprintf(stderr, "strata cluster %s: cannot find this binary: %s\n", c->sub, strerror(errno));
        return -1;
    }
    c->self[n] = 0;
    if (clusterfile_state_dir(&c->cf, c->state_dir, sizeof(c->state_dir), err) < 0) {
        fprintf(stderr, "strata cluster %s: %s\n", c->sub, err);
        return -1;
    }
    snprintf(c->state_path, sizeof(c->state_path), "%s/state", c->state_dir);
    c->st = calloc(1, sizeof(*c->st));
    if (!c->st) {
        fprintf(stderr, "strata cluster %s: out of memory\n", c->sub);
        return -1;
    }
    if (lock && !c->dry_run) {
        char logs[CLUSTERFILE_PATH_MAX + 8], lp[CLUSTERFILE_PATH_MAX + 8];
        snprintf(logs, sizeof(logs), "%s/logs", c->state_dir);
        if (mkdir_p(logs, 0700, err) < 0) {
            fprintf(stderr, "strata cluster %s: state directory: %s\n", c->sub, err);
            return -1;
        }
        snprintf(lp, sizeof(lp), "%s/lock", c->state_dir);
        c->lock_fd = open(lp, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
        if (c->lock_fd < 0) {
            fprintf(stderr, "strata cluster %s: cannot open %s: %s\n", c->sub, lp, strerror(errno));
            return -1;
        }
        if (flock(c->lock_fd, LOCK_EX | LOCK_NB) < 0) {
            fprintf(stderr, "strata cluster %s: another strata cluster command is working on cluster %s (%s is "
                    "locked)\n", c->sub, c->cf.name, lp);
            return -1;
        }
    }
    if (cluster_state_load(c->st, c->state_path, err) < 0) {
        fprintf(stderr, "strata cluster %s: %s\n", c->sub, err);
        return -1;
    }
    if (c->st->cluster[0] && strcmp(c->st->cluster, c->cf.name)) {
        fprintf(stderr, "strata cluster %s: the state in %s belongs to cluster %s, not %s (set state_dir)\n", c->sub,
                c->state_dir, c->st->cluster, c->cf.name);
        return -1;
    }
    snprintf(c->st->cluster, sizeof(c->st->cluster), "%s", c->cf.name);
    char sp[CLUSTERFILE_PATH_MAX * 2 + 2] = "";
    if (c->cf.secret_file[0]) {
        const struct clusterfile_node local = {.launch = CLUSTERFILE_LAUNCH_LOCAL};
        if (clusterfile_node_path(&c->cf, &local, c->cf.secret_file, sp, sizeof(sp), err) < 0) {
            fprintf(stderr, "strata cluster %s: %s\n", c->sub, err);
            return -1;
        }
    }
    if (cli_read_secret("cluster", sp[0] ? sp : NULL, &c->secret, &c->secret_len) < 0) return -1;
    if (c->cf.api_key_file[0]) {
        const struct clusterfile_node local = {.launch = CLUSTERFILE_LAUNCH_LOCAL};
        char *k = NULL;
        size_t kl = 0;
        if (clusterfile_node_path(&c->cf, &local, c->cf.api_key_file, sp, sizeof(sp), err) < 0 ||
            file_read_all(sp, &k, &kl, 1 << 16, err) < 0) {
            fprintf(stderr, "strata cluster %s: api_key_file: %s\n", c->sub, err);
            return -1;
        }
        while (kl && (k[kl - 1] == '\n' || k[kl - 1] == '\r')) k[--kl] = 0;
        c->api_key = k;
    }
    return 0;
}

static int save_state(struct cl *c)
{
    char err[ST_ERR_LEN];
    if (cluster_state_save(c->st, c->state_path, err) < 0) {
        fprintf(stderr, "strata cluster %s: %s\n", c->sub, err);
        return -1;
    }
    return 0;
}

static const char *proc_where(const struct cluster_proc *p, char *buf, size_t cap)
{
    if (p->launch == CLUSTERFILE_LAUNCH_LOCAL) snprintf(buf, cap, "pid %d", p->pid);
    else snprintf(buf, cap, "pid %d %s %s", p->pid, p->launch == CLUSTERFILE_LAUNCH_SSH ? "on" : "in netns", p->target);
    return buf;
}

/* ---- processes, wherever they run ---- */

static bool proc_alive(const struct cluster_proc *p)
{
    if (p->launch != CLUSTERFILE_LAUNCH_SSH) return cluster_proc_alive(p->pid, p->start_time);
    char script[512], out[256], err[ST_ERR_LEN];
    struct cluster_cmd cmd;
    int status;
    if (cluster_ssh_alive_script(p->pid, p->start_time, script, sizeof(script)) < 0 ||
        cluster_ssh_cmd(p->target, script, &cmd, err) < 0)
        return false;
    int rc = cluster_run_capture(&cmd, SSH_MS, out, sizeof(out), NULL, 0, &status, err);
    cluster_cmd_free(&cmd);
    if (rc < 0 || status != 0) return true; /* cannot tell: assume it is still there */
    return strncmp(out, "alive", 5) == 0;
}

/* Stops one process; prints what happened. Returns 0 when it is gone. termed: SIGTERM was sent already. */
static int proc_stop(struct cl *c, const struct cluster_proc *p, bool termed)
{
    char err[ST_ERR_LEN], where[400];
    bool killed = false;
    int rc;
    proc_where(p, where, sizeof(where));
    if (p->launch != CLUSTERFILE_LAUNCH_SSH && !cluster_proc_alive(p->pid, p->start_time)) {
        if (termed) printf("stopped %s %s (%s)\n", cluster_role_name(p->role), p->node, where);
        else printf("%s %s (%s) had already exited\n", cluster_role_name(p->role), p->node, where);
        return 0;
    }
    if (p->launch != CLUSTERFILE_LAUNCH_SSH) {
        rc = cluster_proc_stop(p->pid, p->start_time, c->cf.stop_timeout_s * 1000, &killed, err);
    } else {
        char script[1024], out[256], eout[1024];
        struct cluster_cmd cmd;
        int status = 0;
        rc = cluster_ssh_stop_script(p->pid, p->start_time, c->cf.stop_timeout_s, script, sizeof(script));
        if (rc == ST_OK) rc = cluster_ssh_cmd(p->target, script, &cmd, err);
        else err_set(err, rc, "bad pid");
        if (rc == ST_OK) {
            rc = cluster_run_capture(&cmd, (c->cf.stop_timeout_s + 15) * 1000, out, sizeof(out), eout, sizeof(eout),
                                     &status, err);
            cluster_cmd_free(&cmd);
            if (rc == ST_OK && status != 0)
                rc = err_set(err, ST_EIO, "ssh %s exited with %d: %s", p->target, status, eout);
            if (rc == ST_OK) killed = strncmp(out, "killed", 6) == 0;
        }
    }
    if (rc < 0) {
        fprintf(stderr, "strata cluster %s: %s %s (%s): %s\n", c->sub, cluster_role_name(p->role), p->node, where, err);
        return -1;
    }
    printf("stopped %s %s (%s)%s\n", cluster_role_name(p->role), p->node, where,
           killed ? ": it did not exit after SIGTERM and was killed" : "");
    fflush(stdout);
    return 0;
}

/* The last line of a process's log since offset that names the failure (NEEDLE if found, else any line). */
static void proc_log_reason(const struct cluster_proc *p, uint64_t offset, const char *needle, char *out, size_t cap)
{
    char err[ST_ERR_LEN];
    out[0] = 0;
    if (p->launch != CLUSTERFILE_LAUNCH_SSH) {
        if (!needle || cluster_log_last_line(p->log, offset, needle, out, cap, err) < 0)
            cluster_log_last_line(p->log, offset, NULL, out, cap, err);
        return;
    }
    char script[CLUSTERFILE_PATH_MAX + 64], q[CLUSTERFILE_PATH_MAX * 4 + 8], buf[8192];
    struct cluster_cmd cmd;
    int status;
    if (cluster_shell_quote(p->log, q, sizeof(q)) < 0) return;
    snprintf(script, sizeof(script), "tail -n 20 %s", q);
    if (cluster_ssh_cmd(p->target, script, &cmd, err) < 0) return;
    if (cluster_run_capture(&cmd, SSH_MS, buf, sizeof(buf), NULL, 0, &status, err) == 0) {
        char *best = NULL, *any = NULL, *save = NULL;
        for (char *line = strtok_r(buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
            if (!line[0]) continue;
            any = line;
            if (needle && strstr(line, needle)) best = line;
        }
        if (best || any) snprintf(out, cap, "%s", best ? best : any);
    }
    cluster_cmd_free(&cmd);
}

static uint64_t file_size(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 ? (uint64_t)sb.st_size : 0;
}

/* Launches a process of a role on node n and records it. *log_offset is where this run's output starts. */
static int proc_launch(struct cl *c, const struct clusterfile_node *n, enum cluster_role role,
                       const struct cluster_cmd *inner, const char *address, struct cluster_proc *out,
                       uint64_t *log_offset)
{
    char err[ST_ERR_LEN], line[8192];
    const char *rname = cluster_role_name(role);
    struct cluster_proc p = {.role = role, .launch = n->launch, .started_unix = (int64_t)time(NULL)};
    snprintf(p.node, sizeof(p.node), "%s", n->name);
    snprintf(p.target, sizeof(p.target), "%s", n->target);
    snprintf(p.address, sizeof(p.address), "%s", address);
    if (clusterfile_log_path(&c->cf, n, c->state_dir, rname, p.log, sizeof(p.log), err) < 0) goto fail;
    struct cluster_cmd launch;
    if (clusterfile_launch_cmd(&c->cf, n, inner, p.log, &launch, err) < 0) goto fail;
    cluster_cmd_format(&launch, line, sizeof(line));
    *log_offset = 0;
    int rc;
    if (n->launch == CLUSTERFILE_LAUNCH_SSH) {
        char outb[256], eout[2048];
        int status = 0;
        rc = cluster_run_capture(&launch, SSH_MS, outb, sizeof(outb), eout, sizeof(eout), &status, err);
        if (rc == ST_OK && status != 0) rc = err_set(err, ST_EIO, "ssh exited with %d: %s", status, eout);
        unsigned long long st = 0;
        if (rc == ST_OK && (sscanf(outb, "%d %llu", &p.pid, &st) < 1 || p.pid <= 0))
            rc = err_set(err, ST_EPROTO, "ssh did not print the remote pid (got \"%.100s\")", outb);
        p.start_time = st;
    } else {
        *log_offset = file_size(p.log);
        int lfd = open(p.log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0644);
        FILE *lf = lfd >= 0 ? fdopen(lfd, "a") : NULL;
        if (!lf && lfd >= 0) close(lfd);
        if (lf) {
            time_t now = time(NULL);
            char ts[64];
            strftime(ts, sizeof(ts), "%Y-%m-%d %H:%M:%S", localtime(&now));
            fprintf(lf, "--- %s strata cluster: %s\n", ts, line);
            fclose(lf);
            *log_offset = file_size(p.log);
        }
        rc = cluster_proc_spawn(&launch, p.log, &p.pid, err);
        if (rc == ST_OK) {
            uint64_t st = 0;
            if (cluster_proc_start_time(p.pid, &st, NULL) == 0) p.start_time = st;
        }
    }
    cluster_cmd_free(&launch);
    if (rc < 0) goto fail;
    if (cluster_state_put(c->st, &p) < 0) {
        err_set(err, ST_ERANGE, "state full");
        goto fail;
    }
    if (c->n_started < CLUSTER_STATE_MAX_PROCS) {
        c->started[c->n_started].role = role;
        snprintf(c->started[c->n_started].node, sizeof(c->started[0].node), "%s", n->name);
        c->n_started++;
    }
    save_state(c);
    *out = p;
    return 0;
fail:
    fprintf(stderr, "strata cluster %s: cannot start the %s on node %s: %s\n", c->sub, rname, n->name, err);
    return -1;
}

/* Waits until the worker of node n answers INFO. Prints the outcome. */
static int wait_worker(struct cl *c, const struct clusterfile_node *n, const struct cluster_proc *p,
                       uint64_t log_offset, uint64_t deadline, struct node_info *ni)
{
    char err[ST_ERR_LEN] = "", last[ST_ERR_LEN] = "", why[1024], where[400];
    uint64_t next_alive = 0;
    for (;;) {
        if (g_interrupted) {
            fprintf(stderr, "strata cluster %s: interrupted\n", c->sub);
            return -1;
        }
        uint64_t now = time_ns();
        if (p && (n->launch != CLUSTERFILE_LAUNCH_SSH || now >= next_alive)) {
            if (!proc_alive(p)) {
                proc_log_reason(p, log_offset, "strata worker:", why, sizeof(why));
                fprintf(stderr, "strata cluster %s: the worker on node %s (%s) exited: %s\n  log: %s%s%s\n", c->sub,
                        n->name, proc_where(p, where, sizeof(where)), why[0] ? why : "(no output)", p->log,
                        p->launch == CLUSTERFILE_LAUNCH_SSH ? " on " : "", p->launch == CLUSTERFILE_LAUNCH_SSH ? p->target : "");
                return -1;
            }
            next_alive = now + 2000000000ull;
        }
        double rtt;
        int rc = cluster_probe_worker(n->host, n->port, c->secret, c->secret_len, PROBE_MS, ni, &rtt, err);
        if (rc == ST_OK) {
            if (strcmp(ni->name, n->name)) {
                if (p)
                    fprintf(stderr, "strata cluster %s: %s:%d answers as node \"%s\", not %s: another worker is "
                            "listening there\n", c->sub, n->host, n->port, ni->name, n->name);
                else
                    fprintf(stderr, "strata cluster %s: %s:%d answers as node \"%s\", not %s: start that worker with "
                            "--name %s\n", c->sub, n->host, n->port, ni->name, n->name, n->name);
                return -1;
            }
            char dev[300], fr[32];
            device_string(ni, dev, sizeof(dev));
            fmt_bytes(ni->dev_total_bytes ? ni->dev_free_bytes : ni->mem_free_bytes, fr, sizeof(fr));
            printf("worker %s up at %s:%d (%s): %s, %s free%s\n", n->name, n->host, n->port,
                   p ? proc_where(p, where, sizeof(where)) : "managed elsewhere", dev, fr,
                   ni->has_model ? ", own model copy" : "");
            fflush(stdout);
            return 0;
        }
        if (rc == ST_EAUTH || (rc == ST_EPROTO && strstr(err, "secret"))) {
            fprintf(stderr, "strata cluster %s: worker %s (%s:%d) refused the cluster link: %s\n", c->sub, n->name,
                    n->host, n->port, err);
            return -1;
        }
        snprintf(last, sizeof(last), "%s", err);
        if (time_ns() >= deadline) {
            fprintf(stderr, "strata cluster %s: the worker on node %s (%s:%d) did not answer within %d s: %s\n",
                    c->sub, n->name, n->host, n->port, c->cf.start_timeout_s, last);
            if (p) fprintf(stderr, "  log: %s\n", p->log);
            return -1;
        }
        sleep_ms(POLL_MS);
    }
}

/* GET /v1/cluster from the coordinator at host:port; NULL when it does not answer with JSON. */
static json_t *get_cluster_json(struct cl *c, const char *host, int port, int *status)
{
    char *body = NULL, err[ST_ERR_LEN];
    size_t len = 0;
    *status = 0;
    if (cluster_http_get(host, port, "/v1/cluster", c->api_key, PROBE_MS * 2, MAX_JSON, status, &body, &len, err) < 0)
        return NULL;
    json_t *j = *status == 200 ? json_loadb(body, len, 0, NULL) : NULL;
    free(body);
    if (j && !json_is_object(j)) {
        json_decref(j);
        j = NULL;
    }
    return j;
}

/* Waits until the coordinator on node n serves (/health 200). */
static int wait_coordinator(struct cl *c, const struct clusterfile_node *n, const struct cluster_proc *p,
                            uint64_t log_offset, uint64_t deadline)
{
    char host[256], err[ST_ERR_LEN] = "", last[ST_ERR_LEN] = "", why[1024], where[400];
    int port;
    uint64_t next_alive = 0;
    clusterfile_api_address(&c->cf, n, host, sizeof(host), &port);
    for (;;) {
        if (g_interrupted) {
            fprintf(stderr, "strata cluster %s: interrupted\n", c->sub);
            return -1;
        }
        uint64_t now = time_ns();
        if (n->launch != CLUSTERFILE_LAUNCH_SSH || now >= next_alive) {
            if (!proc_alive(p)) {
                proc_log_reason(p, log_offset, "strata serve:", why, sizeof(why));
                const char *msg = why;
                if (!strncmp(msg, "strata serve: ", 14)) msg += 14;
                fprintf(stderr, "strata cluster %s: the coordinator on node %s (%s) failed: %s\n  log: %s\n", c->sub,
                        n->name, proc_where(p, where, sizeof(where)), msg[0] ? msg : "(no output)", p->log);
                return -1;
            }
            next_alive = now + 2000000000ull;
        }
        int status = 0;
        char *body = NULL;
        size_t len = 0;
        int rc = cluster_http_get(host, port, "/health", NULL, PROBE_MS, 65536, &status, &body, &len, err);
        if (rc == ST_OK && status == 200) {
            free(body);
            printf("coordinator on %s serves http://%s:%d (%s)\n", n->name, host, port,
                   proc_where(p, where, sizeof(where)));
            fflush(stdout);
            return 0;
        }
        if (rc == ST_OK) snprintf(last, sizeof(last), "/health %d %.200s", status, body ? body : "");
        else snprintf(last, sizeof(last), "%s", err);
        free(body);
        if (time_ns() >= deadline) {
            fprintf(stderr, "strata cluster %s: the coordinator on node %s (http://%s:%d) is not healthy after %d s: "
                    "%s\n  log: %s\n", c->sub, n->name, host, port, c->cf.start_timeout_s, last, p->log);
            return -1;
        }
        sleep_ms(POLL_MS);
    }
}

/* After a healthy start: every worker of the file verified, as the coordinator reports it. */
static void report_verification(struct cl *c, const struct clusterfile_node *coord)
{
    char host[256];
    int port, status;
    clusterfile_api_address(&c->cf, coord, host, sizeof(host), &port);
    json_t *j = get_cluster_json(c, host, port, &status);
    if (!j) {
        printf("coordinator: GET /v1/cluster answered %d (no per-node report)\n", status);
        return;
    }
    json_t *nodes = json_object_get(j, "nodes");
    int verified = 0, workers = 0;
    size_t i;
    json_t *v;
    json_array_foreach(nodes, i, v) {
        const char *role = json_string_value(json_object_get(v, "role"));
        if (role && !strcmp(role, "coordinator")) continue;
        workers++;
        verified += json_is_true(json_object_get(v, "verified"));
    }
    printf("weights verified on %d of %d stages\n", verified, workers);
    json_decref(j);
}

/* ---- start / stop ---- */

/* Forgets state entries whose process is gone; returns how many are still running. */
static int prune_state(struct cl *c)
{
    int alive = 0;
    for (int i = 0; i < c->st->n_procs;) {
        if (proc_alive(&c->st->procs[i])) {
            alive++;
            i++;
        } else {
            cluster_state_remove(c->st, c->st->procs[i].role, c->st->procs[i].node);
        }
    }
    return alive;
}

/* Stops everything in the state: the coordinator first, then the workers. */
static int stop_all(struct cl *c)
{
    int failed = 0;
    for (int pass = 0; pass < 2; pass++) {
        enum cluster_role role = pass == 0 ? CLUSTER_ROLE_COORDINATOR : CLUSTER_ROLE_WORKER;
        /* SIGTERM every local process of the role first, so they shut down together; forget those already gone */
        for (int i = 0; i < c->st->n_procs;) {
            struct cluster_proc *p = &c->st->procs[i];
            char where[400];
            if (p->role != role || p->launch == CLUSTERFILE_LAUNCH_SSH) {
                i++;
            } else if (cluster_proc_alive(p->pid, p->start_time)) {
                kill(p->pid, SIGTERM);
                i++;
            } else {
                printf("%s %s (%s) had already exited\n", cluster_role_name(role), p->node,
                       proc_where(p, where, sizeof(where)));
                cluster_state_remove(c->st, role, p->node);
                save_state(c);
            }
        }
        for (int i = 0; i < c->st->n_procs;) {
            struct cluster_proc *p = &c->st->procs[i];
            if (p->role != role) {
                i++;
                continue;
            }
            if (proc_stop(c, p, true) < 0) {
                failed++;
                i++;
                continue;
            }
            cluster_state_remove(c->st, p->role, p->node);
            save_state(c);
        }
    }
    return failed ? -1 : 0;
}

/* Stops what this run started (after a failure). */
static void rollback(struct cl *c)
{
    if (c->n_started == 0) return;
    printf("stopping what this command started\n");
    for (int pass = 0; pass < 2; pass++)
        for (int i = c->n_started - 1; i >= 0; i--) {
            enum cluster_role role = pass == 0 ? CLUSTER_ROLE_COORDINATOR : CLUSTER_ROLE_WORKER;
            if (c->started[i].role != role) continue;
            struct cluster_proc *p = cluster_state_find(c->st, role, c->started[i].node);
            if (!p) continue;
            if (proc_stop(c, p, false) == 0) {
                cluster_state_remove(c->st, role, c->started[i].node);
                save_state(c);
            }
        }
    c->n_started = 0;
}

static int print_plan(struct cl *c, const struct clusterfile_node *coord)
{
    char err[ST_ERR_LEN], line[8192], log[CLUSTERFILE_PATH_MAX];
    for (int i = 0; i <= c->cf.n_nodes; i++) {
        const struct clusterfile_node *n = i < c->cf.n_nodes ? &c->cf.nodes[i] : coord;
        if (i < c->cf.n_nodes && !n->worker) continue;
        if (i < c->cf.n_nodes && !n->managed) {
            printf("worker %s: managed elsewhere, expected at %s:%d\n", n->name, n->host, n->port);
            continue;
        }
        struct cluster_cmd inner, launch;
        const char *role = i < c->cf.n_nodes ? "worker" : "coordinator";
        int rc = i < c->cf.n_nodes ? clusterfile_worker_cmd(&c->cf, n, c->self, &inner, err)
                                   : clusterfile_coordinator_cmd(&c->cf, n, c->self, &inner, err);
        if (rc < 0) {
            fprintf(stderr, "strata cluster %s: %s\n", c->sub, err);
            return -1;
        }
        if (clusterfile_log_path(&c->cf, n, c->state_dir, role, log, sizeof(log), err) < 0 ||
            clusterfile_launch_cmd(&c->cf, n, &inner, log, &launch, err) < 0) {
            cluster_cmd_free(&inner);
            fprintf(stderr, "strata cluster %s: %s\n", c->sub, err);
            return -1;
        }
        cluster_cmd_format(&launch, line, sizeof(line));
        printf("%s %s (%s): %s\n", role, n->name, clusterfile_launch_name(n->launch), line);
        if (n->launch != CLUSTERFILE_LAUNCH_SSH) printf("  log: %s\n", log);
        cluster_cmd_free(&inner);
        cluster_cmd_free(&launch);
    }
    return 0;
}

/* Nothing may answer at node n's API address yet: it would answer our health checks in place of the coordinator
 * we start. */
static int api_address_free(struct cl *c, const struct clusterfile_node *n)
{
    char err[ST_ERR_LEN], host[256], *body = NULL;
    int port, status = 0;
    size_t len;
    clusterfile_api_address(&c->cf, n, host, sizeof(host), &port);
    if (cluster_http_get(host, port, "/health", NULL, 500, 65536, &status, &body, &len, err) < 0) return 0;
    free(body);
    fprintf(stderr, "strata cluster %s: http://%s:%d already answers (HTTP %d): a server not started by this cluster "
            "holds the API address of node %s\n", c->sub, host, port, status, n->name);
    return -1;
}

/* On this machine (local, netns), the coordinator's model directory can be checked before anything stops or starts. */
static int coordinator_model_ok(struct cl *c, const struct clusterfile_node *n)
{
    char dir[CLUSTERFILE_PATH_MAX * 2 + 2], cfg[CLUSTERFILE_PATH_MAX * 2 + 16], err[ST_ERR_LEN];
    if (n->launch == CLUSTERFILE_LAUNCH_SSH) return 0;
    if (clusterfile_node_path(&c->cf, n, n->model[0] ? n->model : c->cf.model, dir, sizeof(dir), err) < 0) {
        fprintf(stderr, "strata cluster %s: %s\n", c->sub, err);
        return -1;
    }
    snprintf(cfg, sizeof(cfg), "%s/config.json", dir);
    if (file_exists(cfg)) return 0;
    fprintf(stderr, "strata cluster %s: the coordinator on node %s needs the model directory %s, which has no "
            "config.json\n", c->sub, n->name, dir);
    return -1;
}

static int start_coordinator(struct cl *c, const struct clusterfile_node *coord, uint64_t deadline)
{
    char err[ST_ERR_LEN], host[256], addr[300];
    int port, status = 0;
    struct cluster_cmd inner;
    struct cluster_proc p;
    uint64_t off;
    clusterfile_api_address(&c->cf, coord, host, sizeof(host), &port);
    snprintf(addr, sizeof(addr), "%s:%d", host, port);
    if (api_address_free(c, coord) < 0) return -1;
    if (clusterfile_coordinator_cmd(&c->cf, coord, c->self, &inner, err) < 0) {
        fprintf(stderr, "strata cluster %s: %s\n", c->sub, err);
        return -1;
    }
    int rc = proc_launch(c, coord, CLUSTER_ROLE_COORDINATOR, &inner, addr, &p, &off);
    cluster_cmd_free(&inner);
    if (rc < 0) return -1;
    if (wait_coordinator(c, coord, &p, off, deadline) < 0) return -1;
    /* the coordinator that answers must be ours */
    json_t *j = get_cluster_json(c, host, port, &status);
    json_t *jpid = j ? json_object_get(json_object_get(j, "coordinator"), "pid") : NULL;
    if (json_is_integer(jpid) && json_integer_value(jpid) != p.pid) {
        fprintf(stderr, "strata cluster %s: http://%s is served by pid %lld, not by the coordinator started on %s "
                "(pid %d)\n", c->sub, addr, (long long)json_integer_value(jpid), coord->name, p.pid);
        json_decref(j);
        return -1;
    }
    json_decref(j);
    return 0;
}

static int do_start(struct cl *c, const struct clusterfile_node *coord)
{
    char err[ST_ERR_LEN], addr[300];
    if (c->dry_run) return print_plan(c, coord);
    int running = prune_state(c);
    save_state(c);
    if (running) {
        fprintf(stderr, "strata cluster %s: cluster %s is already running (%d process%s; see strata cluster status, "
                "or stop / restart it)\n", c->sub, c->cf.name, running, running == 1 ? "" : "es");
        return -1;
    }
    if (api_address_free(c, coord) < 0 || coordinator_model_ok(c, coord) < 0) return -1;
    /* a worker already listening at a node's address (not recorded in the state) would be taken for ours */
    for (int i = 0; i < c->cf.n_nodes; i++) {
        const struct clusterfile_node *n = &c->cf.nodes[i];
        struct node_info ni;
        if (!n->worker || !n->managed ||
            cluster_probe_worker(n->host, n->port, c->secret, c->secret_len, 500, &ni, NULL, err) < 0)
            continue;
        fprintf(stderr, "strata cluster %s: a worker (node \"%s\") already answers at %s:%d, where node %s's worker "
                "is to run: stop it first\n", c->sub, ni.name, n->host, n->port, n->name);
        return -1;
    }
    uint64_t deadline = time_ns() + (uint64_t)c->cf.start_timeout_s * 1000000000ull;
    struct cluster_proc procs[CLUSTERFILE_MAX_NODES];
    uint64_t offs[CLUSTERFILE_MAX_NODES] = {0};
    for (int i = 0; i < c->cf.n_nodes; i++) {
        const struct clusterfile_node *n = &c->cf.nodes[i];
        if (!n->worker || !n->managed) continue;
        struct cluster_cmd inner;
        if (clusterfile_worker_cmd(&c->cf, n, c->self, &inner, err) < 0) {
            fprintf(stderr, "strata cluster %s: %s\n", c->sub, err);
            goto fail;
        }
        snprintf(addr, sizeof(addr), "%s:%d", n->host, n->port);
        int rc = proc_launch(c, n, CLUSTER_ROLE_WORKER, &inner, addr, &procs[i], &offs[i]);
        cluster_cmd_free(&inner);
        if (rc < 0) goto fail;
    }
    for (int i = 0; i < c->cf.n_nodes; i++) {
        const struct clusterfile_node *n = &c->cf.nodes[i];
        struct node_info ni;
        if (n->worker && wait_worker(c, n, n->managed ? &procs[i] : NULL, offs[i], deadline, &ni) < 0) goto fail;
    }
    if (start_coordinator(c, coord, deadline) < 0) goto fail;
    report_verification(c, coord);
    printf("cluster %s started: %d worker%s, coordinator on %s\n", c->cf.name, clusterfile_n_workers(&c->cf),
           clusterfile_n_workers(&c->cf) == 1 ? "" : "s", coord->name);
    return 0;
fail:
    rollback(c);
    return -1;
}

/* The node the coordinator should start on at restart: where it runs (after a migration), else the file's. */
static const struct clusterfile_node *current_coordinator_node(struct cl *c)
{
    struct cluster_proc *p = cluster_state_find(c->st, CLUSTER_ROLE_COORDINATOR, NULL);
    if (p) {
        const struct clusterfile_node *n = clusterfile_node_find(&c->cf, p->node);
        if (n && n->coordinator != CLUSTERFILE_COORD_NO) return n;
    }
    return clusterfile_coordinator(&c->cf);
}

static int do_stop(struct cl *c)
{
    if (c->st->n_procs == 0) {
        printf("cluster %s: nothing is running\n", c->cf.name);
        return 0;
    }
    int rc = stop_all(c);
    if (rc == 0) printf("cluster %s stopped\n", c->cf.name);
    return rc;
}

static int do_migrate(struct cl *c, const char *to)
{
    const struct clusterfile_node *target = clusterfile_node_find(&c->cf, to);
    if (!target) {
        fprintf(stderr, "strata cluster migrate: no node \"%s\" in %s\n", to, c->cf.path);
        return -1;
    }
    if (target->coordinator == CLUSTERFILE_COORD_NO) {
        fprintf(stderr, "strata cluster migrate: node %s cannot be the coordinator: set coordinator = candidate in "
                "[node %s] (%s:%d)\n", to, to, c->cf.path, target->line);
        return -1;
    }
    struct cluster_proc *old = cluster_state_find(c->st, CLUSTER_ROLE_COORDINATOR, NULL);
    if (!old || !proc_alive(old)) {
        fprintf(stderr, "strata cluster migrate: the coordinator of cluster %s is not running (strata cluster start)\n",
                c->cf.name);
        return -1;
    }
    if (!strcmp(old->node, to)) {
        printf("the coordinator already runs on %s\n", to);
        return 0;
    }
    const struct clusterfile_node *from = clusterfile_node_find(&c->cf, old->node);
    if (!from) {
        fprintf(stderr, "strata cluster migrate: the coordinator runs on node %s, which is no longer in %s\n",
                old->node, c->cf.path);
        return -1;
    }
    /* every worker must be there for the new coordinator to form the pipeline */
    for (int i = 0; i < c->cf.n_nodes; i++) {
        const struct clusterfile_node *n = &c->cf.nodes[i];
        if (!n->worker) continue;
        struct cluster_proc *w = cluster_state_find(c->st, CLUSTER_ROLE_WORKER, n->name);
        char err[ST_ERR_LEN] = "not running";
        struct node_info ni;
        if ((n->managed && (!w || !proc_alive(w))) ||
            cluster_probe_worker(n->host, n->port, c->secret, c->secret_len, PROBE_MS * 2, &ni, NULL, err) < 0) {
            fprintf(stderr, "strata cluster migrate: worker %s (%s:%d) is not up: %s; the coordinator stays on %s\n",
                    n->name, n->host, n->port, err, old->node);
            return -1;
        }
    }
    char oh[256], nh[256];
    int op, np;
    clusterfile_api_address(&c->cf, from, oh, sizeof(oh), &op);
    clusterfile_api_address(&c->cf, target, nh, sizeof(nh), &np);
    if (((strcmp(oh, nh) || op != np) && api_address_free(c, target) < 0) || coordinator_model_ok(c, target) < 0)
        return -1;
    printf("migrating the coordinator: %s (http://%s:%d) -> %s (http://%s:%d)\n", from->name, oh, op, target->name, nh,
           np);
    fflush(stdout);
    struct cluster_proc gone = *old;
    if (proc_stop(c, &gone, false) < 0) return -1;
    cluster_state_remove(c->st, CLUSTER_ROLE_COORDINATOR, gone.node);
    save_state(c);
    uint64_t deadline = time_ns() + (uint64_t)c->cf.start_timeout_s * 1000000000ull;
    c->n_started = 0;
    if (start_coordinator(c, target, deadline) == 0) {
        report_verification(c, target);
        printf("coordinator migrated to %s: http://%s:%d\n", target->name, nh, np);
        return 0;
    }
    rollback(c);
    fprintf(stderr, "strata cluster migrate: starting the coordinator on %s failed; starting it again on %s\n",
            target->name, from->name);
    deadline = time_ns() + (uint64_t)c->cf.start_timeout_s * 1000000000ull;
    if (start_coordinator(c, from, deadline) == 0)
        fprintf(stderr, "strata cluster migrate: the coordinator is back on %s (http://%s:%d)\n", from->name, oh, op);
    else
        fprintf(stderr, "strata cluster migrate: the coordinator could not be started again on %s either: the "
                "cluster has no coordinator (strata cluster restart)\n", from->name);
    return -1;
}

/* ---- status ---- */

static json_t *find_node_json(json_t *cluster, const struct clusterfile_node *n)
{
    json_t *nodes = json_object_get(cluster, "nodes"), *v;
    size_t i;
    char addr[300];
    snprintf(addr, sizeof(addr), "%s:%d", n->host, n->port);
    json_array_foreach(nodes, i, v) {
        const char *a = json_string_value(json_object_get(v, "address"));
        const char *role = json_string_value(json_object_get(v, "role"));
        if (role && !strcmp(role, "coordinator")) continue;
        if (a && !strcmp(a, addr)) return v;
    }
    json_array_foreach(nodes, i, v) {
        const char *nm = json_string_value(json_object_get(v, "name"));
        const char *role = json_string_value(json_object_get(v, "role"));
        if (role && !strcmp(role, "coordinator")) continue;
        if (nm && !strcmp(nm, n->name)) return v;
    }
    return NULL;
}

static void jset(json_t *o, const char *k, json_t *v) { json_object_set_new(o, k, v ? v : json_null()); }

static json_t *jcopy(json_t *src, const char *k)
{
    json_t *v = src ? json_object_get(src, k) : NULL;
    return v ? json_deep_copy(v) : json_null();
}

static int do_status(struct cl *c)
{
    char err[ST_ERR_LEN];
    struct cluster_proc *cp = cluster_state_find(c->st, CLUSTER_ROLE_COORDINATOR, NULL);
    const struct clusterfile_node *coord = cp ? clusterfile_node_find(&c->cf, cp->node) : NULL;
    if (!coord) coord = clusterfile_coordinator(&c->cf);
    bool coord_running = cp && proc_alive(cp);
    char host[256];
    int port, health = 0;
    char reason[512] = "";
    clusterfile_api_address(&c->cf, coord, host, sizeof(host), &port);
    if (cp) { /* where it was started (the file may have changed since) */
        const char *colon = strrchr(cp->address, ':');
        long pp = colon ? strtol(colon + 1, NULL, 10) : 0;
        if (colon && pp > 0 && pp < 65536 && (size_t)(colon - cp->address) < sizeof(host)) {
            snprintf(host, sizeof(host), "%.*s", (int)(colon - cp->address), cp->address);
            port = (int)pp;
        }
    }
    json_t *cj = NULL;
    if (coord_running) {
        char *body = NULL;
        size_t len = 0;
        if (cluster_http_get(host, port, "/health", NULL, PROBE_MS, 65536, &health, &body, &len, err) < 0) {
            health = 0;
            snprintf(reason, sizeof(reason), "%s", err);
        } else if (health != 200) {
            json_t *h = json_loadb(body, len, 0, NULL);
            const char *r = h ? json_string_value(json_object_get(h, "reason")) : NULL;
            snprintf(reason, sizeof(reason), "/health %d%s%s", health, r ? ": " : "", r ? r : "");
            json_decref(h);
        }
        free(body);
        int st;
        cj = get_cluster_json(c, host, port, &st);
    } else {
        snprintf(reason, sizeof(reason), cp ? "the coordinator process has exited" : "not started");
    }
    json_t *root = json_object(), *jnodes = json_array();
    jset(root, "cluster", json_string(c->cf.name));
    jset(root, "file", json_string(c->cf.path));
    jset(root, "state_dir", json_string(c->state_dir));
    int n_workers = 0, n_workers_up = 0, n_running = coord_running;
    struct row {
        char name[64], addr[300], role[48], layers[32], device[200], free_[32], verified[8], hb[32], tps[32],
            proc[24];
    } *rows = calloc((size_t)c->cf.n_nodes, sizeof(*rows));
    if (!rows || !root || !jnodes) {
        fprintf(stderr, "strata cluster status: out of memory\n");
        json_decref(root);
        json_decref(jnodes);
        json_decref(cj);
        free(rows);
        return 1;
    }
    for (int i = 0; i < c->cf.n_nodes; i++) {
        const struct clusterfile_node *n = &c->cf.nodes[i];
        struct row *r = &rows[i];
        json_t *jn = json_object();
        struct cluster_proc *wp = cluster_state_find(c->st, CLUSTER_ROLE_WORKER, n->name);
        bool is_coord = coord_running && coord == n;
        bool w_alive = wp && proc_alive(wp);
        n_running += w_alive;
        snprintf(r->name, sizeof(r->name), "%s", n->name);
        snprintf(r->addr, sizeof(r->addr), "%s:%d", n->host, n->port);
        snprintf(r->role, sizeof(r->role), "%s%s%s", n->worker ? "worker" : "", n->worker && is_coord ? "+" : "",
                 is_coord ? "coordinator" : "");
        if (!r->role[0]) snprintf(r->role, sizeof(r->role), "candidate");
        jset(jn, "name", json_string(n->name));
        jset(jn, "address", json_string(r->addr));
        jset(jn, "launch", json_string(clusterfile_launch_name(n->launch)));
        jset(jn, "target", n->target[0] ? json_string(n->target) : NULL);
        jset(jn, "role", json_string(r->role));
        jset(jn, "worker", json_boolean(n->worker));
        jset(jn, "coordinator", json_string(n->coordinator == CLUSTERFILE_COORD_YES ? "yes"
                                            : n->coordinator == CLUSTERFILE_COORD_CANDIDATE ? "candidate" : "no"));
        snprintf(r->proc, sizeof(r->proc), "%s", !n->worker ? "-" : !n->managed ? "external" : w_alive ? "running"
                                                 : wp ? "exited" : "stopped");
        jset(jn, "pid", wp ? json_integer(wp->pid) : NULL);
        jset(jn, "process", json_string(r->proc));
        snprintf(r->layers, sizeof(r->layers), "-");
        snprintf(r->device, sizeof(r->device), "-");
        snprintf(r->free_, sizeof(r->free_), "-");
        snprintf(r->verified, sizeof(r->verified), "-");
        snprintf(r->hb, sizeof(r->hb), "-");
        snprintf(r->tps, sizeof(r->tps), "-");
        if (n->worker) {
            n_workers++;
            struct node_info ni;
            double rtt = 0;
            int rc = cluster_probe_worker(n->host, n->port, c->secret, c->secret_len, PROBE_MS, &ni, &rtt, err);
            jset(jn, "reachable", json_boolean(rc == 0));
            if (rc == 0) {
                n_workers_up += w_alive || !n->managed;
                device_string(&ni, r->device, sizeof(r->device));
                uint64_t fr = ni.dev_total_bytes ? ni.dev_free_bytes : ni.mem_free_bytes;
                fmt_bytes(fr, r->free_, sizeof(r->free_));
                jset(jn, "device", json_string(ni.device));
                jset(jn, "cpu", json_string(ni.cpu));
                jset(jn, "cores", json_integer(ni.cores));
                jset(jn, "mem_total_bytes", json_integer((json_int_t)ni.mem_total_bytes));
                jset(jn, "mem_free_bytes", json_integer((json_int_t)ni.mem_free_bytes));
                jset(jn, "dev_total_bytes", json_integer((json_int_t)ni.dev_total_bytes));
                jset(jn, "dev_free_bytes", json_integer((json_int_t)ni.dev_free_bytes));
                jset(jn, "host_name", json_string(ni.host));
                jset(jn, "version", json_string(ni.version));
                jset(jn, "probe_rtt_ms", json_real(rtt));
            } else {
                jset(jn, "probe_error", json_string(err));
            }
            json_t *pn = cj ? find_node_json(cj, n) : NULL;
            json_t *ly = pn ? json_object_get(pn, "layers") : NULL;
            if (json_array_size(ly) == 2)
                snprintf(r->layers, sizeof(r->layers), "%lld-%lld",
                         (long long)json_integer_value(json_array_get(ly, 0)),
                         (long long)json_integer_value(json_array_get(ly, 1)));
            json_t *ver = pn ? json_object_get(pn, "verified") : NULL;
            if (ver) snprintf(r->verified, sizeof(r->verified), "%s", json_is_true(ver) ? "yes" : "NO");
            json_t *hb = pn ? json_object_get(pn, "last_heartbeat_s") : NULL;
            if (json_is_number(hb)) snprintf(r->hb, sizeof(r->hb), "%.1fs ago", json_number_value(hb));
            json_t *tps = pn ? json_object_get(pn, "tokens_per_s") : NULL;
            if (json_is_number(tps)) snprintf(r->tps, sizeof(r->tps), "%.1f", json_number_value(tps));
            jset(jn, "layers", jcopy(pn, "layers"));
            jset(jn, "verified", jcopy(pn, "verified"));
            jset(jn, "connected", jcopy(pn, "connected"));
            jset(jn, "last_heartbeat_s", jcopy(pn, "last_heartbeat_s"));
            jset(jn, "rtt_ms", jcopy(pn, "rtt_ms"));
            jset(jn, "compute_s", jcopy(pn, "compute_s"));
            jset(jn, "batches", jcopy(pn, "batches"));
            jset(jn, "tokens_per_s", jcopy(pn, "tokens_per_s"));
            jset(jn, "error", jcopy(pn, "error"));
        }
        json_array_append_new(jnodes, jn);
    }
    bool healthy = coord_running && health == 200 && n_workers_up == n_workers;
    const char *state = healthy ? "running" : n_running ? "degraded" : "stopped";
    jset(root, "status", json_string(state));
    json_t *jc = json_object();
    jset(jc, "node", json_string(coord->name));
    char url[400];
    snprintf(url, sizeof(url), "http://%s:%d", host, port);
    jset(jc, "url", json_string(url));
    jset(jc, "pid", cp ? json_integer(cp->pid) : NULL);
    jset(jc, "running", json_boolean(coord_running));
    jset(jc, "health_status", json_integer(health));
    jset(jc, "healthy", json_boolean(coord_running && health == 200));
    jset(jc, "reason", json_string(reason));
    jset(jc, "model", jcopy(cj, "model"));
    jset(jc, "epoch", jcopy(cj, "epoch"));
    jset(jc, "reforms", jcopy(cj, "reforms"));
    jset(jc, "n_layers", jcopy(cj, "n_layers"));
    jset(root, "coordinator", jc);
    jset(root, "nodes", jnodes);
    jset(root, "throughput", jcopy(cj, "throughput"));
    if (c->json) {
        char *s = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
        if (s) printf("%s\n", s);
        free(s);
    } else {
        printf("cluster %s: %s; coordinator %s on %s (%s%s%s)\n", c->cf.name, state, url, coord->name,
               coord_running ? (health == 200 ? "healthy" : "unhealthy") : "not running", reason[0] ? ": " : "",
               reason);
        int wn = 4, wa = 7, wr = 4, wl = 6, wd = 6, wf = 4;
        for (int i = 0; i < c->cf.n_nodes; i++) {
            wn = ST_MAX(wn, (int)strlen(rows[i].name));
            wa = ST_MAX(wa, (int)strlen(rows[i].addr));
            wr = ST_MAX(wr, (int)strlen(rows[i].role));
            wl = ST_MAX(wl, (int)strlen(rows[i].layers));
            wd = ST_MAX(wd, ST_MIN(48, (int)strlen(rows[i].device)));
            wf = ST_MAX(wf, (int)strlen(rows[i].free_));
        }
        printf("%-*s  %-*s  %-*s  %-*s  %-*s  %-*s  %-8s  %-10s  %-7s  %s\n", wn, "NODE", wa, "ADDRESS", wr, "ROLE", wl,
               "LAYERS", wd, "DEVICE", wf, "FREE", "VERIFIED", "HEARTBEAT", "TOK/S", "PROCESS");
        for (int i = 0; i < c->cf.n_nodes; i++) {
            struct row *r = &rows[i];
            printf("%-*s  %-*s  %-*s  %-*s  %-*.48s  %-*s  %-8s  %-10s  %-7s  %s\n", wn, r->name, wa, r->addr, wr,
                   r->role, wl, r->layers, wd, r->device, wf, r->free_, r->verified, r->hb, r->tps, r->proc);
        }
        json_t *tp = cj ? json_object_get(cj, "throughput") : NULL;
        if (tp)
            printf("throughput: %lld tokens generated, %.1f tokens/s\n",
                   (long long)json_integer_value(json_object_get(tp, "generated_tokens")),
                   json_number_value(json_object_get(tp, "tokens_per_s")));
    }
    json_decref(root);
    json_decref(cj);
    free(rows);
    return healthy ? 0 : n_running ? 1 : 3;
}

/* ---- entry ---- */

int cmd_cluster(int argc, char **argv)
{
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "help")) {
        usage(argc < 2 ? stderr : stdout, NULL);
        return argc < 2 ? 2 : 0;
    }
    static const char *subs[] = {"start", "stop", "restart", "status", "migrate"};
    const char *sub = argv[1];
    bool known = false;
    for (size_t i = 0; i < ST_ARRAY_LEN(subs); i++) known |= !strcmp(sub, subs[i]);
    if (!known) {
        fprintf(stderr, "strata cluster: unknown subcommand \"%s\" (start, stop, restart, status, migrate)\n", sub);
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0); /* progress lines show up at once, in order with the errors */
    struct cl *c = calloc(1, sizeof(*c));
    if (!c) {
        fprintf(stderr, "strata cluster: out of memory\n");
        return 1;
    }
    c->sub = sub;
    c->lock_fd = -1;
    const char *file = getenv("STRATA_CLUSTER_FILE"), *to = NULL;
    char cmdname[32];
    snprintf(cmdname, sizeof(cmdname), "cluster %s", sub);
    int status = 2;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v;
#define VAL() do { if (!(v = cli_value(cmdname, argc, argv, &i))) goto out; } while (0)
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout, sub);
            status = 0;
            goto out;
        } else if (!strcmp(a, "-c") || !strcmp(a, "--config")) { VAL(); file = v; }
        else if (!strcmp(a, "--json") && !strcmp(sub, "status")) c->json = true;
        else if (!strcmp(a, "--dry-run") && (!strcmp(sub, "start") || !strcmp(sub, "restart"))) c->dry_run = true;
        else if (!strcmp(a, "--to") && !strcmp(sub, "migrate")) { VAL(); to = v; }
        else {
            fprintf(stderr, "strata cluster %s: unknown option \"%s\" (see strata cluster %s --help)\n", sub, a, sub);
            goto out;
        }
#undef VAL
    }
    if (!file || !file[0]) {
        fprintf(stderr, "strata cluster %s: no cluster file: -c FILE (or env STRATA_CLUSTER_FILE)\n", sub);
        goto out;
    }
    if (!strcmp(sub, "migrate") && !to) {
        fprintf(stderr, "strata cluster migrate: --to NODE is required\n");
        goto out;
    }
    status = 1;
    if (ctx_open(c, file, strcmp(sub, "status") != 0) < 0) goto out;
    /* a signal while starting rolls back what was started; stop and migrate finish what they began */
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    if (!strcmp(sub, "start")) {
        status = do_start(c, clusterfile_coordinator(&c->cf)) == 0 ? 0 : 1;
    } else if (!strcmp(sub, "stop")) {
        status = do_stop(c) == 0 ? 0 : 1;
    } else if (!strcmp(sub, "restart")) {
        const struct clusterfile_node *coord = current_coordinator_node(c);
        if (c->dry_run) status = do_start(c, coord) == 0 ? 0 : 1;
        else status = do_stop(c) == 0 && do_start(c, coord) == 0 ? 0 : 1;
    } else if (!strcmp(sub, "status")) {
        status = do_status(c);
    } else {
        status = do_migrate(c, to) == 0 ? 0 : 1;
    }
out:
    fflush(stdout);
    ctx_free(c);
    free(c);
    return status;
}
