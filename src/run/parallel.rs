//! Doing the same thing for several items at once, one scoped thread each: the sites of a
//! lab, the VMs of a site. Results come back in the items' order.

/// `work` applied to every item, in parallel.
pub fn each<T: Send, R: Send>(
    items: impl IntoIterator<Item = T>,
    work: impl Fn(T) -> R + Sync,
) -> Vec<R> {
    let work = &work;
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .into_iter()
            .map(|item| scope.spawn(move || work(item)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a worker thread panicked"))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn results_keep_the_items_order() {
        assert_eq!(super::each([3, 1, 2], |n| n * 10), [30, 10, 20]);
    }
}
