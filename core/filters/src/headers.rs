//! `meshpy.Headers`: a live view of an HTTP header map, case-insensitive and
//! multi-valued. Nothing is converted to Python until a hook asks for it.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use pyo3::exceptions::{PyKeyError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyList, PyMapping, PyString, PyTuple};

#[pyclass(module = "meshpy._core", name = "Headers", mapping)]
#[derive(Default)]
pub struct PyHeaders {
    pub map: HeaderMap,
}

fn name(text: &str) -> PyResult<HeaderName> {
    HeaderName::from_bytes(text.as_bytes())
        .map_err(|_| PyValueError::new_err(format!("invalid header name {text:?}")))
}

fn value(text: &str) -> PyResult<HeaderValue> {
    // Header values are bytes on the wire; Latin-1 is how str maps onto them one to one.
    let bytes: Option<Vec<u8>> = text.chars().map(|c| u8::try_from(u32::from(c)).ok()).collect();
    bytes
        .and_then(|b| HeaderValue::from_bytes(&b).ok())
        .ok_or_else(|| PyValueError::new_err(format!("invalid header value {text:?}")))
}

fn text(value: &HeaderValue) -> String {
    match value.to_str() {
        Ok(text) => text.to_owned(),
        Err(_) => value.as_bytes().iter().map(|&b| char::from(b)).collect(),
    }
}

impl PyHeaders {
    /// Builds headers from a mapping (values a str or a list of str), an iterable of
    /// (name, value) pairs, or another Headers.
    pub fn from_py(items: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let mut headers = Self::default();
        let Some(items) = items else { return Ok(headers) };
        if let Ok(other) = items.cast::<PyHeaders>() {
            return Ok(Self { map: other.borrow().map.clone() });
        }
        let pairs = match items.cast::<PyMapping>() {
            Ok(mapping) => mapping.items()?.into_any(),
            Err(_) => items.clone(),
        };
        for pair in pairs.try_iter()? {
            let pair = pair?;
            let (key, val): (String, Bound<'_, PyAny>) = pair
                .extract()
                .map_err(|_| PyTypeError::new_err("expected header (name, value) pairs or a mapping"))?;
            match val.extract::<String>() {
                Ok(one) => headers.add(&key, &one)?,
                Err(_) => {
                    let many: Vec<String> = val
                        .extract()
                        .map_err(|_| PyTypeError::new_err("a header value must be a str or a list of str"))?;
                    for one in many {
                        headers.add(&key, &one)?;
                    }
                }
            }
        }
        Ok(headers)
    }
}

#[pymethods]
impl PyHeaders {
    #[new]
    #[pyo3(signature = (items=None))]
    fn new(items: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        Self::from_py(items)
    }

    /// The first value of `name`.
    fn __getitem__(&self, name: &str) -> PyResult<String> {
        self.map.get(name).map(text).ok_or_else(|| PyKeyError::new_err(name.to_owned()))
    }

    /// Replaces every value of `name` with `value`.
    fn __setitem__(&mut self, name: &str, value: &str) -> PyResult<()> {
        let header = self::name(name)?;
        self.map.insert(header, self::value(value)?);
        Ok(())
    }

    fn __delitem__(&mut self, name: &str) -> PyResult<()> {
        match self.map.remove(name) {
            Some(_) => Ok(()),
            None => Err(PyKeyError::new_err(name.to_owned())),
        }
    }

    fn __contains__(&self, name: &Bound<'_, PyAny>) -> bool {
        name.cast::<PyString>().ok().and_then(|n| n.to_str().ok()).is_some_and(|n| self.map.contains_key(n))
    }

    /// The number of distinct header names.
    fn __len__(&self) -> usize {
        self.map.keys_len()
    }

    fn __iter__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(PyList::new(py, self.map.keys().map(HeaderName::as_str))?.try_iter()?.into_any().unbind())
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other.cast::<PyHeaders>().is_ok_and(|o| o.borrow().map == self.map)
    }

    fn __repr__(&self) -> String {
        let items: Vec<String> =
            self.map.iter().map(|(n, v)| format!("({:?}, {:?})", n.as_str(), text(v))).collect();
        format!("Headers([{}])", items.join(", "))
    }

    /// The first value of `name`, or `default`.
    #[pyo3(signature = (name, default=None))]
    fn get(&self, py: Python<'_>, name: &str, default: Option<Py<PyAny>>) -> PyResult<Py<PyAny>> {
        match self.map.get(name) {
            Some(v) => Ok(PyString::new(py, &text(v)).into_any().unbind()),
            None => Ok(default.unwrap_or_else(|| py.None())),
        }
    }

    /// Every value of `name`, in order; empty when absent.
    fn get_all(&self, name: &str) -> Vec<String> {
        self.map.get_all(name).iter().map(text).collect()
    }

    /// Appends a value, keeping those already there.
    fn add(&mut self, name: &str, value: &str) -> PyResult<()> {
        let header = self::name(name)?;
        self.map.append(header, self::value(value)?);
        Ok(())
    }

    /// Removes `name` and returns its first value, or `default` when absent.
    #[pyo3(signature = (name, default=None))]
    fn pop(&mut self, py: Python<'_>, name: &str, default: Option<Py<PyAny>>) -> PyResult<Py<PyAny>> {
        let first = self.map.get(name).map(text);
        self.map.remove(name);
        match first {
            Some(v) => Ok(PyString::new(py, &v).into_any().unbind()),
            None => Ok(default.unwrap_or_else(|| py.None())),
        }
    }

    /// Distinct names, lower-case, in order of first appearance.
    fn keys(&self) -> Vec<String> {
        self.map.keys().map(|n| n.as_str().to_owned()).collect()
    }

    /// Every (name, value) pair; a name with several values appears once per value.
    fn items<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        self.map.iter().map(|(n, v)| PyTuple::new(py, [n.as_str().to_owned(), text(v)])).collect()
    }
}
