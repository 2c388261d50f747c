// A structural check of a frame header before msgpackr sees it. msgpackr understands more
// than plain MessagePack: extension types build records (with generated code), Dates,
// RegExps, Sets, BigInts, and nesting recurses on the JS stack. A header is peer input, so
// only the plain types a header can legally hold get through: nil, booleans, numbers,
// strings, binaries, arrays and maps with string keys, nested at most `maxDepth` deep,
// exactly one value filling the buffer. Iterative, so depth costs no stack.

/** Returns why `bytes` is not one plain MessagePack value, or undefined when it is. */
export function checkPlainMsgpack(bytes: Uint8Array, maxDepth: number): string | undefined {
  const end = bytes.length;
  // Items still to read in each open container; maps count keys and values. The root is a
  // container of one item.
  const remaining: number[] = [1];
  const isMap: boolean[] = [false];
  let pos = 0;

  const readLength = (width: number): number => {
    let n = 0;
    for (let i = 0; i < width; i++) n = n * 256 + (bytes[pos + i] ?? 0);
    pos += width;
    return n;
  };

  while (remaining.length > 0) {
    const level = remaining.length - 1;
    const left = remaining[level] ?? 0;
    const expectKey = isMap[level] === true && left % 2 === 0;
    remaining[level] = left - 1;
    if (pos >= end) return `truncated at byte ${pos}`;
    const at = pos;
    const token = bytes[pos++] ?? 0;

    let skip = 0; // bytes of the item after its token and length
    let children = -1; // >= 0 when the item is a container
    let childIsMap = false;
    let isString = false;
    let lengthWidth = 0;

    if (token <= 0x7f || token >= 0xe0) {
      // positive / negative fixint
    } else if (token <= 0x8f) {
      children = (token & 0x0f) * 2;
      childIsMap = true;
    } else if (token <= 0x9f) {
      children = token & 0x0f;
    } else if (token <= 0xbf) {
      skip = token & 0x1f;
      isString = true;
    } else {
      switch (token) {
        case 0xc0: // nil
        case 0xc2: // false
        case 0xc3: // true
          break;
        case 0xc4: lengthWidth = 1; break; // bin 8
        case 0xc5: lengthWidth = 2; break; // bin 16
        case 0xc6: lengthWidth = 4; break; // bin 32
        case 0xca: skip = 4; break; // float 32
        case 0xcb: skip = 8; break; // float 64
        case 0xcc: case 0xd0: skip = 1; break; // (u)int 8
        case 0xcd: case 0xd1: skip = 2; break; // (u)int 16
        case 0xce: case 0xd2: skip = 4; break; // (u)int 32
        case 0xcf: case 0xd3: skip = 8; break; // (u)int 64
        case 0xd9: lengthWidth = 1; isString = true; break; // str 8
        case 0xda: lengthWidth = 2; isString = true; break; // str 16
        case 0xdb: lengthWidth = 4; isString = true; break; // str 32
        case 0xdc: lengthWidth = 2; children = 0; break; // array 16
        case 0xdd: lengthWidth = 4; children = 0; break; // array 32
        case 0xde: lengthWidth = 2; children = 0; childIsMap = true; break; // map 16
        case 0xdf: lengthWidth = 4; children = 0; childIsMap = true; break; // map 32
        default:
          // 0xc1 (never used), ext 8/16/32 and fixext 1..16
          return `type byte 0x${token.toString(16)} at byte ${at} is not plain MessagePack`;
      }
    }
    if (expectKey && !isString) return `map key at byte ${at} is not a string`;

    if (lengthWidth > 0) {
      if (end - pos < lengthWidth) return `truncated at byte ${pos}`;
      const n = readLength(lengthWidth);
      if (children === 0) children = childIsMap ? n * 2 : n;
      else skip = n;
    }
    if (skip > end - pos) return `item at byte ${at} runs past the end`;
    if (expectKey && skip === 9 && isProtoKey(bytes, pos)) {
      return `map key '__proto__' at byte ${at} is not allowed`;
    }
    pos += skip;

    if (children >= 0) {
      if (remaining.length > maxDepth) return `nesting deeper than ${maxDepth} at byte ${at}`;
      // Every item takes at least one byte: a count beyond the bytes left is a lie.
      if (children > end - pos) return `container at byte ${at} claims more items than bytes left`;
      if (children > 0) {
        remaining.push(children);
        isMap.push(childIsMap);
      }
    }
    while (remaining.length > 0 && remaining[remaining.length - 1] === 0) {
      remaining.pop();
      isMap.pop();
    }
  }
  if (pos !== end) return `${end - pos} bytes after the end of the value`;
  return undefined;
}

const PROTO = [0x5f, 0x5f, 0x70, 0x72, 0x6f, 0x74, 0x6f, 0x5f, 0x5f]; // '__proto__'

function isProtoKey(bytes: Uint8Array, pos: number): boolean {
  for (let i = 0; i < PROTO.length; i++) if (bytes[pos + i] !== PROTO[i]) return false;
  return true;
}
