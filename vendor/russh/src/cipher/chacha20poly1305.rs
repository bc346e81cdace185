// Copyright 2016 Pierre-Étienne Meunier
//
// Licensed under the Apache License, Version 2.0 (the "License");
// you may not use this file except in compliance with the License.
// You may obtain a copy of the License at
//
// http://www.apache.org/licenses/LICENSE-2.0
//
// Unless required by applicable law or agreed to in writing, software
// distributed under the License is distributed on an "AS IS" BASIS,
// WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
// See the License for the specific language governing permissions and
// limitations under the License.
//

// http://cvsweb.openbsd.org/cgi-bin/cvsweb/src/usr.bin/ssh/PROTOCOL.chacha20poly1305?annotate=HEAD

#[cfg(feature = "aws-lc-rs")]
use aws_lc_rs::aead::chacha20_poly1305_openssh;
#[cfg(all(not(feature = "aws-lc-rs"), feature = "ring"))]
use ring::aead::chacha20_poly1305_openssh;

use chacha20::cipher::{KeyIvInit, StreamCipher};
use poly1305::universal_hash::KeyInit;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::super::Error;
use crate::mac::MacAlgorithm;

/// Packets from this size on (length field, payload and padding) are sealed and opened with
/// RustCrypto's `chacha20` and `poly1305` instead of ring's (Berth's patch). Both compute the
/// same function; which one is faster depends on the size. ring's ChaCha20 is fast, but its
/// Poly1305 on x86_64 is the portable C one; RustCrypto's Poly1305 (AVX2) and ChaCha20 (AVX2,
/// or AVX-512 with `--cfg chacha20_avx512`) are faster over a bulk packet of 32 KiB (19
/// against 28 µs here) but cost about 1–2 µs more to set up per packet: a keystroke's packet
/// stays with ring.
const BULK: usize = 8192;

/// The two ChaCha20 keys of the OpenSSH construction (PROTOCOL.chacha20poly1305): K_2, the
/// first 32 bytes of the key material, for the payload and Poly1305's key; K_1, the last 32,
/// for the packet length.
struct BulkKeys {
    k_2: Zeroizing<[u8; 32]>,
    k_1: Zeroizing<[u8; 32]>,
}

impl BulkKeys {
    fn new(k: &[u8]) -> Self {
        let mut k_2 = Zeroizing::new([0u8; 32]);
        let mut k_1 = Zeroizing::new([0u8; 32]);
        k_2.copy_from_slice(&k[..32]);
        k_1.copy_from_slice(&k[32..64]);
        Self { k_2, k_1 }
    }

    /// ChaCha20 (64-bit nonce and block counter) keyed by `key`, at block 0 of the packet
    /// `sequence_number`.
    fn cipher(key: &[u8; 32], sequence_number: u32) -> chacha20::ChaCha20Legacy {
        let nonce = chacha20::LegacyNonce::from(u64::from(sequence_number).to_be_bytes());
        chacha20::ChaCha20Legacy::new(&chacha20::Key::from(*key), &nonce)
    }

    /// K_2's stream at block 0 (Poly1305's key is its first 32 bytes), positioned at block 1,
    /// where the payload's keystream starts.
    fn payload(&self, sequence_number: u32) -> (chacha20::ChaCha20Legacy, poly1305::Poly1305) {
        let mut stream = Self::cipher(&self.k_2, sequence_number);
        let mut block = Zeroizing::new([0u8; 64]);
        stream.apply_keystream(&mut block[..]);
        let mut poly_key = poly1305::Key::default();
        poly_key.copy_from_slice(&block[..32]);
        let mac = poly1305::Poly1305::new(&poly_key);
        zeroize::Zeroize::zeroize(poly_key.as_mut_slice());
        (stream, mac)
    }

    fn seal(&self, sequence_number: u32, packet: &mut [u8], tag: &mut [u8]) {
        let (length, rest) = packet.split_at_mut(super::PACKET_LENGTH_LEN);
        Self::cipher(&self.k_1, sequence_number).apply_keystream(length);
        let (mut stream, mac) = self.payload(sequence_number);
        stream.apply_keystream(rest);
        tag.copy_from_slice(&mac.compute_unpadded(packet));
    }

    fn open<'a>(
        &self,
        sequence_number: u32,
        packet: &'a mut [u8],
        tag: &[u8],
    ) -> Result<&'a [u8], Error> {
        let (mut stream, mac) = self.payload(sequence_number);
        let expected = mac.compute_unpadded(packet);
        if !bool::from(expected.as_slice().ct_eq(tag)) {
            return Err(Error::DecryptionError);
        }
        let rest = &mut packet[super::PACKET_LENGTH_LEN..];
        stream.apply_keystream(rest);
        Ok(rest)
    }
}

pub struct SshChacha20Poly1305Cipher {}

impl super::Cipher for SshChacha20Poly1305Cipher {
    fn key_len(&self) -> usize {
        chacha20_poly1305_openssh::KEY_LEN
    }

    fn make_opening_key(
        &self,
        k: &[u8],
        _: &[u8],
        _: &[u8],
        _: &dyn MacAlgorithm,
    ) -> Box<dyn super::OpeningKey + Send> {
        Box::new(OpeningKey(
            chacha20_poly1305_openssh::OpeningKey::new(
                #[allow(clippy::unwrap_used)]
                k.try_into().unwrap(),
            ),
            BulkKeys::new(k),
        ))
    }

    fn make_sealing_key(
        &self,
        k: &[u8],
        _: &[u8],
        _: &[u8],
        _: &dyn MacAlgorithm,
    ) -> Box<dyn super::SealingKey + Send> {
        Box::new(SealingKey(
            chacha20_poly1305_openssh::SealingKey::new(
                #[allow(clippy::unwrap_used)]
                k.try_into().unwrap(),
            ),
            BulkKeys::new(k),
        ))
    }
}

pub struct OpeningKey(chacha20_poly1305_openssh::OpeningKey, BulkKeys);

pub struct SealingKey(chacha20_poly1305_openssh::SealingKey, BulkKeys);

impl super::OpeningKey for OpeningKey {
    fn decrypt_packet_length(
        &self,
        sequence_number: u32,
        encrypted_packet_length: &[u8],
    ) -> [u8; 4] {
        self.0.decrypt_packet_length(
            sequence_number,
            #[allow(clippy::unwrap_used)]
            encrypted_packet_length.try_into().unwrap(),
        )
    }

    fn tag_len(&self) -> usize {
        chacha20_poly1305_openssh::TAG_LEN
    }

    fn open<'a>(
        &mut self,
        sequence_number: u32,
        ciphertext_and_tag: &'a mut [u8],
    ) -> Result<&'a [u8], Error> {
        let ciphertext_len = ciphertext_and_tag.len() - self.tag_len();
        let (ciphertext_in_plaintext_out, tag) = ciphertext_and_tag.split_at_mut(ciphertext_len);

        if ciphertext_in_plaintext_out.len() >= BULK {
            return self
                .1
                .open(sequence_number, ciphertext_in_plaintext_out, tag);
        }
        self.0
            .open_in_place(
                sequence_number,
                ciphertext_in_plaintext_out,
                #[allow(clippy::unwrap_used)]
                &tag.try_into().unwrap(),
            )
            .map_err(|_| Error::DecryptionError)
    }
}

impl super::SealingKey for SealingKey {
    fn padding_length(&self, payload: &[u8]) -> usize {
        let block_size = 8;
        let extra_len = super::PACKET_LENGTH_LEN + super::PADDING_LENGTH_LEN;
        let padding_len = if payload.len() + extra_len <= super::MINIMUM_PACKET_LEN {
            super::MINIMUM_PACKET_LEN - payload.len() - super::PADDING_LENGTH_LEN
        } else {
            block_size - ((super::PADDING_LENGTH_LEN + payload.len()) % block_size)
        };
        if padding_len < super::PACKET_LENGTH_LEN {
            padding_len + block_size
        } else {
            padding_len
        }
    }

    // As explained in "SSH via CTR mode with stateful decryption" in
    // https://openvpn.net/papers/ssh-security.pdf, the padding doesn't need to
    // be random because we're doing stateful counter-mode encryption. Use
    // fixed padding to avoid PRNG overhead.
    fn fill_padding(&self, padding_out: &mut [u8]) {
        for padding_byte in padding_out {
            *padding_byte = 0;
        }
    }

    fn tag_len(&self) -> usize {
        chacha20_poly1305_openssh::TAG_LEN
    }

    fn seal(
        &mut self,
        sequence_number: u32,
        plaintext_in_ciphertext_out: &mut [u8],
        tag: &mut [u8],
    ) {
        if plaintext_in_ciphertext_out.len() >= BULK {
            return self
                .1
                .seal(sequence_number, plaintext_in_ciphertext_out, tag);
        }
        self.0.seal_in_place(
            sequence_number,
            plaintext_in_ciphertext_out,
            #[allow(clippy::unwrap_used)]
            tag.try_into().unwrap(),
        );
    }
}

#[cfg(all(test, not(feature = "aws-lc-rs"), feature = "ring"))]
mod tests {
    use super::*;
    use crate::cipher::{Cipher as _, OpeningKey as _, SealingKey as _};

    /// Berth's patch: the bulk path computes ring's function, byte for byte, and refuses what
    /// ring refuses.
    #[test]
    fn the_bulk_path_is_ring_s_construction() {
        let key: Vec<u8> = (0..64u8)
            .map(|i| i.wrapping_mul(37).wrapping_add(11))
            .collect();
        let ring_seal = chacha20_poly1305_openssh::SealingKey::new(key[..].try_into().unwrap());
        let ring_open = chacha20_poly1305_openssh::OpeningKey::new(key[..].try_into().unwrap());
        let bulk = BulkKeys::new(&key);
        for len in [8usize, 36, 4100, BULK - 1, BULK, BULK + 4, 32772] {
            for seq in [0u32, 1, 7, u32::MAX] {
                let plain: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
                let (mut a, mut b) = (plain.clone(), plain.clone());
                let (mut tag_a, mut tag_b) = ([0u8; 16], [0u8; 16]);
                ring_seal.seal_in_place(seq, &mut a, &mut tag_a);
                bulk.seal(seq, &mut b, &mut tag_b);
                assert_eq!((&a, tag_a), (&b, tag_b), "sealed {len} bytes, packet {seq}");

                let mut c = a.clone();
                let opened = bulk.open(seq, &mut c, &tag_a).unwrap();
                assert_eq!(opened, &plain[4..]);
                let mut d = a.clone();
                assert_eq!(
                    ring_open.open_in_place(seq, &mut d, &tag_a).unwrap(),
                    &plain[4..]
                );

                let mut forged = tag_a;
                forged[15] ^= 1;
                let mut e = a.clone();
                assert!(bulk.open(seq, &mut e, &forged).is_err());
                assert_eq!(e, a, "a refused packet is left as it came");
                let mut f = a.clone();
                f[len / 2] ^= 0x80;
                assert!(bulk.open(seq, &mut f, &tag_a).is_err());
                let mut g = a.clone();
                assert!(bulk.open(seq.wrapping_add(1), &mut g, &tag_a).is_err());
            }
        }
    }

    /// Through the trait russh calls, each side of the threshold.
    #[test]
    fn sealing_and_opening_agree_across_the_threshold() {
        let key = [5u8; 64];
        let c = SshChacha20Poly1305Cipher {};
        let mac = &crate::mac::_NONE;
        let mut seal = c.make_sealing_key(&key, &[], &[], mac);
        let mut open = c.make_opening_key(&key, &[], &[], mac);
        for len in [64usize, BULK - 8, BULK, 32768] {
            let plain: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut packet = plain.clone();
            packet.extend_from_slice(&[0u8; 16]);
            let (body, tag) = packet.split_at_mut(len);
            seal.seal(3, body, tag);
            assert_eq!(open.decrypt_packet_length(3, &packet[..4]), plain[..4]);
            assert_eq!(open.open(3, &mut packet).unwrap(), &plain[4..]);
        }
    }
}
