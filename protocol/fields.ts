// Typed reads of header fields with messages that name the frame and the field
// ("offer.guest.regions[2].pageSizeBytes: ..."). Every failure is a ProtocolError; the
// reader never trusts a value's type, and a field it was not asked for is an error too.
import { type CodeTable, describeCode, isValidCode, listCodes } from './codes.js';
import { ErrorCode, ProtocolError } from './errors.js';

type Fields = Record<string, unknown>;

export function isPlainMap(value: unknown): value is Fields {
  return (
    typeof value === 'object' &&
    value !== null &&
    !Array.isArray(value) &&
    !ArrayBuffer.isView(value) &&
    (Object.getPrototypeOf(value) === Object.prototype || Object.getPrototypeOf(value) === null)
  );
}

/** A short, bounded rendering of a peer value for error messages. */
export function describeValue(value: unknown): string {
  if (value === null) return 'null';
  if (value === undefined) return 'undefined';
  if (typeof value === 'string') {
    return value.length > 40 ? `a string of ${value.length} chars` : JSON.stringify(value);
  }
  if (typeof value === 'number' || typeof value === 'boolean') return String(value);
  if (value instanceof Uint8Array) return `${value.length} bytes of binary`;
  if (Array.isArray(value)) return `an array of ${value.length}`;
  if (isPlainMap(value)) return 'a map';
  return `a ${typeof value}`;
}

export class FieldReader {
  readonly path: string;
  readonly #fields: Fields;
  readonly #read = new Set<string>();

  constructor(path: string, fields: Fields) {
    this.path = path;
    this.#fields = fields;
  }

  fail(field: string, problem: string, code: ErrorCode = ErrorCode.PROTOCOL): never {
    throw new ProtocolError(code, `${this.path}.${field}: ${problem}`);
  }

  /** The raw value; missing is an error. */
  value(field: string): unknown {
    this.#read.add(field);
    if (!Object.hasOwn(this.#fields, field)) this.fail(field, 'missing');
    return this.#fields[field];
  }

  /** The raw value, or undefined when absent. */
  optional(field: string): unknown {
    this.#read.add(field);
    return Object.hasOwn(this.#fields, field) ? this.#fields[field] : undefined;
  }

  string(field: string, minLength: number, maxLength: number, pattern?: RegExp): string {
    return checkString(this.value(field), minLength, maxLength, pattern, (problem) => this.fail(field, problem));
  }

  integer(field: string, min: number, max: number, code?: ErrorCode): number {
    const v = this.value(field);
    if (typeof v !== 'number' || !Number.isSafeInteger(v)) {
      this.fail(field, `expected an integer, got ${describeValue(v)}`, code);
    }
    if (v < min || v > max) this.fail(field, `${v} is out of range ${min}..${max}`, code);
    return v;
  }

  /** A finite number (fractions allowed). */
  number(field: string, min: number, max: number): number {
    const v = this.value(field);
    if (typeof v !== 'number' || !Number.isFinite(v)) {
      this.fail(field, `expected a finite number, got ${describeValue(v)}`);
    }
    if (v < min || v > max) this.fail(field, `${v} is out of range ${min}..${max}`);
    return v;
  }

  boolean(field: string): boolean {
    const v = this.value(field);
    if (typeof v !== 'boolean') this.fail(field, `expected a boolean, got ${describeValue(v)}`);
    return v;
  }

  bytes(field: string, minLength: number, maxLength: number, code?: ErrorCode): Uint8Array {
    const v = this.value(field);
    if (!(v instanceof Uint8Array)) this.fail(field, `expected binary, got ${describeValue(v)}`, code);
    if (v.length < minLength || v.length > maxLength) {
      this.fail(field, `${v.length} bytes, expected ${minLength}..${maxLength}`, code);
    }
    return v;
  }

  /** A code of `table`: 0 ('invalid') and unknown codes are errors. */
  code<T extends CodeTable>(field: string, table: T): T[keyof T] {
    return checkCode(this.value(field), table, (problem) => this.fail(field, problem));
  }

  /** An array of minCount..maxCount items, each checked by `item` with its index. */
  list<T>(
    field: string,
    minCount: number,
    maxCount: number,
    item: (value: unknown, fail: (problem: string) => never, index: number) => T,
  ): T[] {
    const v = this.value(field);
    if (!Array.isArray(v)) this.fail(field, `expected an array, got ${describeValue(v)}`);
    if (v.length < minCount || v.length > maxCount) {
      this.fail(field, `${v.length} items, expected ${minCount}..${maxCount}`);
    }
    return v.map((value: unknown, index) => item(value, (problem) => this.fail(`${field}[${index}]`, problem), index));
  }

  /** A nested map, read with its own reader (call done() on it). */
  map(field: string): FieldReader {
    const v = this.value(field);
    if (!isPlainMap(v)) this.fail(field, `expected a map, got ${describeValue(v)}`);
    return new FieldReader(`${this.path}.${field}`, v);
  }

  /** The entries of a map with free-form keys (at most maxCount); the caller checks each. */
  entries(field: string, maxCount: number): [string, unknown][] {
    const v = this.value(field);
    if (!isPlainMap(v)) this.fail(field, `expected a map, got ${describeValue(v)}`);
    const entries = Object.entries(v);
    if (entries.length > maxCount) this.fail(field, `${entries.length} entries, expected at most ${maxCount}`);
    return entries;
  }

  /** Marks a field as read without reading it (the frame type key). */
  skip(field: string): void {
    this.#read.add(field);
  }

  /** Every field present must have been read: an unknown field is a peer bug, not noise. */
  done(): void {
    for (const key of Object.keys(this.#fields)) {
      if (!this.#read.has(key)) this.fail(key, 'unknown field');
    }
  }
}

export function checkString(
  v: unknown,
  minLength: number,
  maxLength: number,
  pattern: RegExp | undefined,
  fail: (problem: string) => never,
): string {
  if (typeof v !== 'string') fail(`expected a string, got ${describeValue(v)}`);
  if (v.length < minLength || v.length > maxLength) {
    fail(`${v.length} chars, expected ${minLength}..${maxLength}`);
  }
  if (pattern !== undefined && !pattern.test(v)) fail(`${describeValue(v)} does not match ${pattern.source}`);
  return v;
}

export function checkCode<T extends CodeTable>(
  v: unknown,
  table: T,
  fail: (problem: string) => never,
): T[keyof T] {
  if (typeof v !== 'number' || !Number.isInteger(v)) fail(`expected a code, got ${describeValue(v)}`);
  if (!isValidCode(table, v)) fail(`${describeCode(table, v)} is not one of ${listCodes(table)}`);
  return v;
}
