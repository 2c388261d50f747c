/*
 * The guest's device state: what it keeps outside its memory, as a VM keeps its devices'
 * state, saved when it pauses or exits and taken back on resume (guest-device.c).
 */
#ifndef GANGWAY_GUEST_DEVICE_H
#define GANGWAY_GUEST_DEVICE_H

#include <stdint.h>

#include "guest-layout.h"

struct guest;

uint64_t device_initial(const struct guest_header *h);
void save_device(struct guest *g);
void load_device(struct guest *g);

#endif
