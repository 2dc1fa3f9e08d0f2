"""Test support shipped with the library: the quantizer's and the codec's property oracle and case
generators (:mod:`qoda.testing.generate`, Hypothesis strategies).  Needs the ``test`` extra
(``pip install 'qoda[test]'``); nothing else in the package imports it at module level."""
