// Rates and sizes as operators write them: bits where networking writes bits (tc, iperf3,
// NIC speeds), bytes where a capital B says so, and a refusal that spells out both readings
// where either is plausible. Named after the failure it pins: "--bandwidth 10Mbps" used to
// cap at 10 megabytes per second, eight times the rate asked for.
import { describe, expect, test } from 'vitest';
import { parseBytes, parseRate, QuantityError } from '../../agent/units.js';

describe('parseRate', () => {
  test.each([
    ['10Mbps', 10e6 / 8],
    ['10Mbit/s', 10e6 / 8],
    ['10mbit', 10e6 / 8],
    ['10Mbits/s', 10e6 / 8],
    ['1Gbps', 1e9 / 8],
    ['1Gbit/s', 1e9 / 8],
    ['100kbps', 100e3 / 8],
    ['100kbit/s', 100e3 / 8],
    ['8bit/s', 1],
    ['1Mibit/s', 2 ** 20 / 8],
    ['10MB/s', 10e6],
    ['10MiB/s', 10 * 2 ** 20],
    ['1.5GiB/s', 1.5 * 2 ** 30],
    ['64kB/s', 64e3],
    ['512B/s', 512],
    ['0', 0],
  ])('%s is %d bytes per second', (text, bytesPerSec) => {
    expect(parseRate(text, '--bandwidth')).toBeCloseTo(bytesPerSec, 6);
  });

  test('"--bandwidth 10Mbps" caps at 10 megabits, not 10 megabytes, per second', () => {
    expect(parseRate('10Mbps')).toBe(1_250_000);
  });

  test.each([
    ['10Mb', 'did you mean 10Mbit/s (bits) or 10MB/s (bytes)?'],
    ['10MB', 'did you mean 10Mbit/s (bits) or 10MB/s (bytes)?'],
    ['10Mb/s', 'did you mean 10Mbit/s (bits) or 10MB/s (bytes)?'],
    ['10mb/s', 'did you mean 10Mbit/s (bits) or 10MB/s (bytes)?'],
    ['10MBps', 'did you mean 10Mbit/s (bits) or 10MB/s (bytes)?'],
    ['10M', 'did you mean 10Mbit/s (bits) or 10MB/s (bytes)?'],
    ['1gb', 'did you mean 1Gbit/s (bits) or 1GB/s (bytes)?'],
    ['10', 'has no unit: did you mean 10Mbit/s (bits) or 10MB/s (bytes)?'],
    ['10MiB', 'is a size, not a rate: did you mean 10MiB/s?'],
  ])('refuses %s, spelling out what it could mean', (text, message) => {
    expect(() => parseRate(text, '--bandwidth')).toThrow(QuantityError);
    expect(() => parseRate(text, '--bandwidth')).toThrow(`--bandwidth "${text}" `);
    expect(() => parseRate(text, '--bandwidth')).toThrow(message);
  });

  test.each(['fast', '10furlongs/s', '-5MB/s', '10ps', ''])('refuses %j as not understood', (text) => {
    expect(() => parseRate(text, 'rate')).toThrow(/not understood: use e\.g\. 100MiB\/s/);
  });
});

describe('parseBytes', () => {
  test.each([
    ['64MiB', 64 * 2 ** 20],
    ['64M', 64 * 2 ** 20],
    ['1GiB', 2 ** 30],
    ['1G', 2 ** 30],
    ['64MB', 64e6],
    ['4096B', 4096],
    ['0', 0],
  ])('%s is %d bytes', (text, bytes) => {
    expect(parseBytes(text, '--memory')).toBe(bytes);
  });

  test('a bare number is refused, not read as bytes', () => {
    expect(() => parseBytes('64', '--memory')).toThrow('--memory "64" has no unit: did you mean 64MiB? (a number alone is not read as bytes; write 64B for that)');
  });

  test.each([
    ['64Mb', 'did you mean 64MB or 64MiB?'],
    ['64Mib', 'did you mean 64MiB?'],
    ['8bit', 'did you mean 8B?'],
  ])('refuses bits (%s) for a size', (text, message) => {
    expect(() => parseBytes(text, '--memory')).toThrow(message);
  });

  test('refuses what it does not understand, naming the units', () => {
    expect(() => parseBytes('lots', '--memory')).toThrow(/--memory "lots" is not understood: use a number with a unit B, KiB, MiB/);
  });
});
