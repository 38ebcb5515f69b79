/*
 * rules.c: which device a gift turns, and by how many rounds.
 *
 * Pure functions over a drules_t built by conf.c; no allocation while
 * routing, so the main loop can call them per gift.
 */
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "dispatcher.h"

int
rules_device_valid(const char *s)
{
    size_t i;

    if (s == NULL || s[0] == '\0') {
        return 0;
    }
    for (i = 0; s[i]; i++) {
        char c = s[i];

        if (i >= DSP_DEVICE_MAX) {
            return 0;
        }
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
              || (c >= '0' && c <= '9') || c == '_' || c == '-'))
        {
            return 0;
        }
    }
    return 1;
}

static int
set_has(const dstrset_t *s, const char *v, int nocase)
{
    size_t i;

    if (s->n == 0) {
        return 1;                       /* the field is not constrained */
    }
    if (v == NULL) {
        v = "";
    }
    for (i = 0; i < s->n; i++) {
        if (nocase ? strcasecmp(s->v[i], v) == 0 : strcmp(s->v[i], v) == 0) {
            return 1;
        }
    }
    return 0;
}

static int
cat_cmp(const void *a, const void *b)
{
    return strcmp(((const dcat_entry_t *) a)->gift_id,
                  ((const dcat_entry_t *) b)->gift_id);
}

long
rules_prepare(drules_t *r)
{
    size_t i;

    if (r->ncat > 1) {
        qsort(r->cat, r->ncat, sizeof(r->cat[0]), cat_cmp);
        for (i = 1; i < r->ncat; i++) {
            if (strcmp(r->cat[i - 1].gift_id, r->cat[i].gift_id) == 0) {
                return (long) i;
            }
        }
    }
    return -1;
}

const dcat_entry_t *
rules_catalogue(const drules_t *r, const char *gift_id)
{
    dcat_entry_t key;

    if (r->ncat == 0 || gift_id == NULL || gift_id[0] == '\0') {
        return NULL;
    }
    key.gift_id = (char *) gift_id;
    return bsearch(&key, r->cat, r->ncat, sizeof(r->cat[0]), cat_cmp);
}

droute_rc
rules_route(const drules_t *r, const char *platform, const char *room,
    const char *gift_id, const char *gift_name, uint32_t diamond,
    uint32_t quantity, droute_t *out)
{
    const dcat_entry_t *ce;
    const drule_t      *ru = NULL;
    uint64_t            rounds;
    size_t              i;

    memset(out, 0, sizeof(*out));

    ce = rules_catalogue(r, gift_id);
    if (ce != NULL && (r->cat_override || diamond == 0)) {
        diamond = ce->diamond;
    }
    out->diamond = diamond;

    for (i = 0; i < r->nrule; i++) {
        const drule_t *x = &r->rule[i];

        if (set_has(&x->gift, gift_name, 1)
            && set_has(&x->gift_id, gift_id, 0)
            && set_has(&x->platform, platform, 0)
            && set_has(&x->room, room, 0))
        {
            ru = x;
            break;
        }
    }

    if (ru != NULL) {
        out->device = ru->device;
        out->multiplier = ru->multiplier;
        out->rule = ru;
    } else if (r->default_device != NULL) {
        out->device = r->default_device;
        out->multiplier = r->default_multiplier;
    } else {
        return ROUTE_NO_DEVICE;
    }

    if (rules_rounds(r, diamond, quantity, out->multiplier, &rounds) != 0) {
        return ROUTE_OVERFLOW;
    }
    out->rounds = rounds;
    return ROUTE_OK;
}

int
rules_rounds(const drules_t *r, uint32_t diamond, uint32_t quantity,
    uint32_t multiplier, uint64_t *out)
{
    uint64_t rounds, limit;

    limit = r->max_rounds ? r->max_rounds : DSP_ROUNDS_JSON_MAX;
    if (__builtin_mul_overflow((uint64_t) diamond, (uint64_t) quantity,
                               &rounds)
        || __builtin_mul_overflow(rounds, (uint64_t) multiplier, &rounds)
        || rounds > limit)
    {
        return -1;
    }
    *out = rounds;
    return 0;
}

int
rules_rounds_raw(uint32_t diamond, uint32_t quantity, uint32_t multiplier,
    uint64_t *out)
{
    static const drules_t none;            /* max_rounds 0: 2^53 - 1 */

    return rules_rounds(&none, diamond, quantity, multiplier, out);
}

static void
set_free(dstrset_t *s)
{
    size_t i;

    for (i = 0; i < s->n; i++) {
        free(s->v[i]);
    }
    free(s->v);
    s->v = NULL;
    s->n = 0;
}

void
rules_free(drules_t *r)
{
    size_t i;

    if (r == NULL) {
        return;
    }
    for (i = 0; i < r->nrule; i++) {
        set_free(&r->rule[i].gift);
        set_free(&r->rule[i].gift_id);
        set_free(&r->rule[i].platform);
        set_free(&r->rule[i].room);
        free(r->rule[i].device);
        free(r->rule[i].file);
    }
    free(r->rule);
    for (i = 0; i < r->ncat; i++) {
        free(r->cat[i].gift_id);
    }
    free(r->cat);
    free(r->default_device);
    free(r);
}
