/* cli: the strata command line. The only place that prints to stdout for the user and that exits. */
#ifndef STRATA_CLI_H
#define STRATA_CLI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Each subcommand: argv[0] is the subcommand name; returns the process exit status. */
int cmd_run(int argc, char **argv);
int cmd_verify(int argc, char **argv);
int cmd_convert(int argc, char **argv);
int cmd_tokenize(int argc, char **argv);
int cmd_template(int argc, char **argv);
int cmd_worker(int argc, char **argv);
int cmd_cluster(int argc, char **argv);
int cmd_serve(int argc, char **argv);

/* Shared argument helpers: print "strata CMD: --opt: reason" to stderr and return -1 on a bad value. */
int cli_int(const char *cmd, const char *opt, const char *s, long lo, long hi, long *out);
int cli_float(const char *cmd, const char *opt, const char *s, double lo, double hi, double *out);
/* A byte size: "123", "64K", "512M", "8G", "1T" (binary units). */
int cli_size(const char *cmd, const char *opt, const char *s, uint64_t *out);
/* Parses "1,2,3" into a malloc'd array. */
int cli_ids(const char *cmd, const char *opt, const char *s, int32_t **ids, int *n);
/* The bundled default model directory: ./models/kjv-qwen3-21m-8bit, next to the binary (../models), or the
 * installed copy (/usr/local/share/strata/models). */
const char *cli_default_model(void);
/* Returns the value after option argv[*i] (advancing *i) or prints an error and returns NULL. */
const char *cli_value(const char *cmd, int argc, char **argv, int *i);
/* The shared cluster secret from --secret-file FILE (file may be NULL) or env STRATA_CLUSTER_SECRET; *secret is
 * NULL when none is configured. Prints an error and returns -1 on a bad file. */
int cli_read_secret(const char *cmd, const char *file, char **secret, size_t *len);
/* "HOST:PORT" (HOST may be empty for 127.0.0.1). */
int cli_host_port(const char *cmd, const char *opt, const char *s, char *host, size_t host_cap, int *port);

#endif
